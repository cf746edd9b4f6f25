"""Open a GeoTIFF (or any GDAL raster) and read RGB windows on a processing grid.

Geodata rules (DESIGN.md): band roles from the colour interpretation or the
user's band list, percentile stretch for non-8-bit data computed once per
raster (so tiles and requests agree), nodata/alpha/mask honoured, optional
resampling to a scale factor or ground sample distance.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import CRSError, NodataShadowWarning, NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.transform import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from .errors import EmptyResultError, InputError, OutsideBboxError, nothing_valid, shown
from .ground import as_pyproj, crs_label, degrees_per_unit, ground_pixel_size, keeps_areas
from .options import MAX_SCALE, MIN_SCALE, check_bbox, check_scale_or_gsd, check_value_range
from .files import check_raster_name, is_gdal_virtual

SAMPLE_SIDE = 1024  # long side of the decimated read used for statistics and checks


@dataclass(frozen=True)
class PixelWindow:
    """Rows [row_off, row_off + height) and columns [col_off, col_off + width) of the processing grid."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row_off, self.row_off + self.height)

    def covers(self, height: int, width: int) -> bool:
        """Whether the window is the whole of a height x width grid."""
        return (self.row_off, self.col_off, self.height, self.width) == (0, 0, height, width)

    @property
    def cols(self) -> slice:
        return slice(self.col_off, self.col_off + self.width)


class PixelSource(Protocol):
    """What the sliding-window engine reads: RGB windows of a processing grid, height x width pixels.

    RasterSource (a raster on disk) and sliding.ArraySource (an image in memory) are the two kinds.
    A source whose pixels come out the same in whichever window they are read (no resampling) says
    so with a true `same_in_any_window`; the engine then reads the rows two strips share only once.
    """

    height: int
    width: int

    def read(self, window: PixelWindow) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) float32 RGB in 0..255 (0 where invalid) and (h, w) bool validity of `window`. The
        RGB is a new array, the caller's to change (the engine normalises it in place)."""
        ...


@dataclass
class RasterSource:
    """An open raster plus how to turn its bands into 0-255 RGB on the processing grid."""

    path: Path
    dataset: rasterio.io.DatasetReader
    bands: list[int]
    scale: float
    value_range: list[tuple[float, float]] | None
    palette: np.ndarray | None = None  # (256, 3) colour table of a paletted band, looked up after reading
    # The factor down the rows where it differs from `scale` across the columns (a --gsd on pixels that
    # are not square on the ground: degrees away from the equator, 2 x 5 m pixels); None: the same.
    scale_y: float | None = None
    # The requested box (boxes xmin, ymin, xmax, ymax in the raster's CRS) where the pixel window reaches well
    # beyond it: on a rotated grid (the window is the box's envelope in pixels), and for a box across the
    # antimeridian of a world raster (its two strips, at the raster's west and east edges). Pixels whose
    # centres lie outside every box are read as they are (the model's context) but are not valid, so they
    # get no class and no polygon.
    clip: tuple[tuple[float, float, float, float], ...] | None = None
    width: int = field(init=False)
    height: int = field(init=False)
    transform: Affine = field(init=False)

    def __post_init__(self) -> None:
        ds = self.dataset
        if self.scale_y == self.scale:
            self.scale_y = None
        self.width = max(1, round(ds.width * self.scale))
        self.height = max(1, round(ds.height * self.scales[1]))
        self.transform = ds.transform @ Affine.scale(ds.width / self.width, ds.height / self.height)
        # Without a mask its blocks of 255s need not be built for every read.
        self._all_valid = all_pixels_valid(ds)

    @property
    def crs(self) -> CRS:
        return self.dataset.crs

    @property
    def scales(self) -> tuple[float, float]:
        """(across the columns, down the rows): the factors from native to processing pixels."""
        return self.scale, self.scale if self.scale_y is None else self.scale_y

    @property
    def scale_record(self) -> float | list[float]:
        """The factor for reports and cache keys: one number, or [x, y] where they differ."""
        return self.scale if self.scale_y is None else [self.scale, self.scale_y]

    @property
    def same_in_any_window(self) -> bool:
        """On the raster's own grid each pixel is read as it is; resampled, a pixel's value depends on
        where the window around it starts."""
        return self.scales == (1.0, 1.0)

    def _source_window(self, window: PixelWindow) -> Window:
        fx, fy = self.dataset.width / self.width, self.dataset.height / self.height
        return Window(window.col_off * fx, window.row_off * fy, window.width * fx, window.height * fy)

    def _resampling(self) -> Resampling:
        # Palette indices are labels, not intensities: never interpolate them.
        return Resampling.nearest if self.scales == (1.0, 1.0) or self.palette is not None else Resampling.bilinear

    def read(self, window: PixelWindow, shape: tuple[int, int] | None = None,
             every: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(3, h, w) float32 RGB in 0..255 and (h, w) bool validity for a processing-grid window
        (resampled to `shape` when given: a large window read decimated by GDAL; or, with `every`,
        only its every-th row and column from the first, as a full read would give them)."""
        shape = shape or (window.height, window.width)
        src_window = self._source_window(window)
        unique = sorted(set(self.bands))
        try:
            resampling = self._resampling()
            data = self.dataset.read(unique, window=src_window, out_shape=(len(unique), *shape),
                                     resampling=resampling)
            if resampling != Resampling.nearest and not np.issubdtype(data.dtype, np.integer):
                # Bilinear spreads a NaN (or inf) to every output pixel it touches (GDAL leaves out nodata
                # values, not NaN): a hole would grow by a ring of pixels whose source pixels hold data. Those
                # take the value of their nearest source pixel; a pixel whose nearest is NaN stays masked, as
                # the validity mask (read nearest) masks a nodata hole.
                spread = ~np.isfinite(data)
                if spread.any():
                    nearest = self.dataset.read(unique, window=src_window, out_shape=(len(unique), *shape),
                                                resampling=Resampling.nearest)
                    data = np.where(spread, nearest, data)
            mask = None if self._all_valid else validity_mask(self.dataset, shape, src_window, unique)
        except RasterioError as exc:
            raise unreadable_pixels(self.path, exc) from exc
        if every > 1:  # before any conversion: what follows works pixel by pixel
            data = data[:, ::every, ::every]
            mask = mask[::every, ::every] if mask is not None else None
        valid = np.ones(data.shape[1:], bool) if mask is None else mask > 0
        all_valid = mask is None
        if not np.issubdtype(data.dtype, np.integer):  # +-inf and NaN masked alike, before any scaling
            valid &= np.isfinite(data).all(axis=0)
            all_valid = False
        # Masked pixels may hold anything (ESRI's -3.4e38 nodata, 1e40 in float64): no overflow warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            if self.palette is not None:
                rgb = self.palette[data[0].astype(np.intp)].transpose(2, 0, 1).astype(np.float32)
            else:  # each band converted straight into its place (no stacked copy converted again)
                rgb = np.empty((len(self.bands), *data.shape[1:]), np.float32)
                # float64 is scaled before it becomes float32 (values beyond float32's range stay finite);
                # other types are scaled in float32, in place.
                early = data.dtype == np.float64
                for i, band in enumerate(self.bands):
                    values = data[unique.index(band)]
                    rgb[i] = self._stretched(values, i) if early else values
                if self.value_range is not None:
                    if not early:
                        for i in range(len(self.bands)):
                            rgb[i] = self._stretched(rgb[i], i)
                    np.clip(rgb, 0.0, 255.0, out=rgb)
        if not all_valid and not valid.all():
            rgb[:, ~valid] = 0.0
        if self.clip is not None:
            valid &= self._inside_clip(window, valid.shape, every)
        return rgb, valid

    def _inside_clip(self, window: PixelWindow, shape: tuple[int, int], every: int) -> np.ndarray:
        """(h, w) bool: whether the centre of each pixel a read of `window` returns lies inside `clip`."""
        assert self.clip is not None
        if every > 1:
            rows = window.row_off + np.arange(shape[0]) * every + 0.5
            cols = window.col_off + np.arange(shape[1]) * every + 0.5
        else:
            rows = window.row_off + (np.arange(shape[0]) + 0.5) * (window.height / shape[0])
            cols = window.col_off + (np.arange(shape[1]) + 0.5) * (window.width / shape[1])
        t = self.transform
        xs = t.a * cols[None, :] + t.b * rows[:, None] + t.c
        ys = t.d * cols[None, :] + t.e * rows[:, None] + t.f
        inside = np.zeros(xs.shape, dtype=bool)
        for xmin, ymin, xmax, ymax in self.clip:
            inside |= (xs >= xmin) & (xs <= xmax) & (ys >= ymin) & (ys <= ymax)
        return inside

    def _stretched(self, values: np.ndarray, band: int) -> np.ndarray:
        """`values` of the band-th colour mapped by its value range onto 0..255 (unclipped); as they are
        without a value range."""
        if self.value_range is None:
            return values
        lo, hi = self.value_range[band]
        return (values - lo) * (255.0 / max(hi - lo, 1e-12))

    def window_transform(self, window: PixelWindow) -> Affine:
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    def window_bounds(self, window: PixelWindow) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the window in the raster's CRS: the envelope of its four corners, so
        that south-up and rotated grids give a true box too."""
        return pixel_envelope(self.transform, window.col_off, window.row_off, window.col_off + window.width,
                              window.row_off + window.height)

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unreadable_pixels(path, error: Exception | None = None) -> InputError:
    """The sentence for pixels GDAL could not read: a source file that is gone (a VRT's or mosaic's, named in
    GDAL's message as 'NAME: No such file or directory') is named, not called damage."""
    said = [str(e) for e in (error, getattr(error, "__cause__", None), getattr(error, "__context__", None)) if e]
    found = [m for m in (re.fullmatch(r"\s*(.+?): No such file or directory\s*", text) for text in said) if m]
    if found and Path(found[0].group(1)).name != Path(str(path)).name:
        return InputError(f"Could not read the pixels of {path}: it refers to the file {found[0].group(1)}, "
                          "which does not exist (moved or deleted since the mosaic or VRT was made). Put it back, or "
                          "rebuild the mosaic (e.g. gdalbuildvrt), and try again.")
    return InputError(f"Could not read the pixels of {path}: the file is damaged or truncated. Re-export it "
                      "(e.g. gdal_translate) and try again.")


def gdal_path(path: str | Path) -> str:
    """The text GDAL opens for `path`: a URL inside a /vsicurl/ path gets back the '//' after its scheme,
    which a pathlib.Path folds into one ('/vsicurl/https:/host/x.tif', which GDAL refused: 'Missing url
    parameter'; a segment run's raster is kept as typed, other commands' still pass through a Path)."""
    return re.sub(r"^(/vsicurl(?:_streaming)?/)([a-z][a-z0-9+.-]*):/(?!/)", r"\1\2://", str(path))


def _checked_name(path: str | Path) -> str:
    """What GDAL opens for a raster name: a virtual path (read wherever GDAL reaches it), a subdataset name as
    typed once its file is there, else a regular file (files.check_raster_name)."""
    return gdal_path(path) if is_gdal_virtual(path) else check_raster_name(path)


def open_dataset(path: str | Path) -> rasterio.io.DatasetReader:
    """Open a raster and check it is georeferenced, with sentences for every failure.

    A GDAL virtual path (/vsis3/..., /vsicurl/...) is read wherever GDAL can reach it; a subdataset
    (NETCDF:"a.nc":var, HDF5:"a.h5"://var, GPKG:a.gpkg:table) is opened by its name."""
    path = _checked_name(path)
    try:
        with warnings.catch_warnings():  # a missing geotransform is our sentence below, not a warning line
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path} is not a raster GDAL can read ({exc}).") from exc
    if ds.subdatasets and (ds.crs is None or ds.transform == Affine.identity()):
        names, count = ds.subdatasets[:3], len(ds.subdatasets)
        ds.close()
        raise InputError(f"{path} holds {count} rasters (GDAL subdatasets: {', '.join(names)}"
                         f"{', ...' if count > 3 else ''}), not one; give the one to segment by its name, e.g. "
                         f"'{names[0]}', or write it to a GeoTIFF first, e.g. gdal_translate '{names[0]}' "
                         f"{Path(path).stem}.tif")
    if ds.gcps[0] and ds.transform == Affine.identity():
        ds.close()
        raise InputError(f"The raster {path} is georeferenced by ground control points only; "
                         "warp it to a map grid first (gdalwarp).")
    if ds.rpcs and ds.transform == Affine.identity():
        ds.close()
        raise InputError(f"The raster {path} is georeferenced by rational polynomial coefficients (RPCs) only, as a "
                         "satellite scene comes; orthorectify it to a map grid first (gdalwarp -rpc -t_srs EPSG:...).")
    if ds.crs is None or ds.transform == Affine.identity():
        ds.close()
        raise InputError(f"The raster {path} has no coordinate reference system or georeferencing; "
                         "georeference it first (QGIS Georeferencer, or gdal_translate -a_srs/-a_ullr).")
    try:
        check_geographic_extent(ds, path)
    except InputError:
        ds.close()
        raise
    complex_bands = [i + 1 for i, dtype in enumerate(ds.dtypes) if str(dtype).startswith("complex")]
    if complex_bands:
        ds.close()
        raise InputError(f"The raster {path} holds complex numbers ({ds.dtypes[complex_bands[0] - 1]}), e.g. radar "
                         "phase data; segmenting needs real-valued bands. Convert it first (e.g. to amplitude).")
    return ds


def check_geographic_extent(ds: rasterio.io.DatasetReader, path: str | Path) -> None:
    """Refuse a raster in a geographic CRS whose coordinates cannot be longitudes and latitudes (a UTM raster
    labelled EPSG:4326, latitude and longitude swapped): it ran, and its polygons came out empty or nowhere
    while its class raster was full. Latitudes may pass the poles by one pixel (pixel-edge registration),
    longitudes may run over one and a half turns (0..360 and across the antimeridian are the same places)."""
    if ds.crs is None or not ds.crs.is_geographic:
        return
    turn = longitude_turn(ds.crs)
    quarter = turn / 4
    left, bottom, right, top = pixel_envelope(ds.transform, 0, 0, ds.width, ds.height)
    pixel = max(abs(ds.transform.e), abs(ds.transform.d), abs(ds.transform.a), abs(ds.transform.b))
    slack = min(pixel, quarter)
    if -quarter - slack <= bottom and top <= quarter + slack and -1.5 * turn <= left and right <= 1.5 * turn:
        return
    raise InputError(f"The raster {path} is in {crs_label(ds.crs)}, a CRS of longitudes and latitudes, but it lies "
                     f"at x {left:.6g}..{right:.6g}, y {bottom:.6g}..{top:.6g}, beyond latitudes "
                     f"-{quarter:g}..{quarter:g} or a turn of longitudes: its CRS is probably wrong (coordinates "
                     "in metres, or latitude and longitude swapped). Assign the right one (QGIS: Layer Properties "
                     "> Source, or gdal_edit.py -a_srs EPSG:...) and run again.")


def select_bands(ds: rasterio.io.DatasetReader, bands: list[int] | None) -> list[int]:
    """Which 1-based bands are red, green, blue."""
    if bands:
        if len(bands) not in (1, 3):
            raise InputError(f"--bands takes 3 band numbers (red, green, blue) or 1 (grey); got {bands}.")
        bad = [b for b in bands if not 1 <= b <= ds.count]
        if bad:
            raise InputError(f"Band(s) {bad} do not exist: {ds.path if hasattr(ds, 'path') else ds.name} "
                             f"has {ds.count} band(s).")
        return list(bands) * 3 if len(bands) == 1 else list(bands)
    interp = list(ds.colorinterp)
    roles = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(role in interp for role in roles):
        return [interp.index(role) + 1 for role in roles]
    colour_bands = _colour_bands(ds)
    if not colour_bands:
        raise InputError(f"{Path(ds.name).name} has only alpha (transparency) bands and no colour band to read; "
                         "if a band holds the image all the same, name it with --bands.")
    if len(colour_bands) >= 3:
        return colour_bands[:3]
    return [colour_bands[0]] * 3


def _colour_bands(ds: rasterio.io.DatasetReader) -> list[int]:
    """The 1-based bands that are not alpha (transparency) bands: those select_bands reads colours from."""
    return [i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha]


def band_choice_warning(ds: rasterio.io.DatasetReader, bands: list[int] | None) -> list[str]:
    """A sentence when select_bands left a band out without a word: of two bands that name no colours, the
    second (more than three are read as 1, 2, 3, the rule QGIS's own first view of them follows too).
    Bands the user named (`bands`) are taken as named, but an alpha (transparency) band among them is
    said: it is read as a colour, not as the mask it is."""
    name = Path(ds.name).name
    if bands:
        alpha = sorted(set(bands) - set(_colour_bands(ds)))
        if not alpha:
            return []
        which = f"band {alpha[0]}" if len(alpha) == 1 else "bands " + ", ".join(map(str, alpha))
        return [f"--bands names {which} of {name}, an alpha (transparency) band: it is read "
                "as a colour here, and transparent pixels are still left out. If that band is not what you meant, "
                "name others with --bands."]
    colour = _colour_bands(ds)
    if len(colour) != 2 or ColorInterp.palette in ds.colorinterp:  # a paletted band shows its own colours
        return []
    return [f"{name} has 2 bands and names no colours: band {colour[0]} is read as grey and band "
            f"{colour[1]} is not used. Name the bands with --bands (3 numbers for red, green, blue, "
            "or 1 for grey)."]


def palette_lut(ds: rasterio.io.DatasetReader, bands: list[int]) -> np.ndarray | None:
    """RGB lookup table when the chosen band is a paletted (colour table) band."""
    band = bands[0]
    if len(set(bands)) != 1 or ds.colorinterp[band - 1] != ColorInterp.palette:
        return None
    try:
        colormap = ds.colormap(band)
    except ValueError:
        return None
    size = max(256, max(colormap) + 1) if np.dtype(ds.dtypes[band - 1]).itemsize == 1 else 65536
    lut = np.zeros((size, 3), np.uint8)
    for index, rgba in colormap.items():
        if index < size:
            lut[index] = rgba[:3]
    return lut


def validity_mask(ds: rasterio.io.DatasetReader, shape: tuple[int, int], window: Window | None = None,
                  bands: Sequence[int] | None = None) -> np.ndarray:
    """(h, w) uint8, non-zero where a pixel of `window` (read at `shape`) holds data: GDAL's dataset mask
    (mask band, alpha band or nodata value), except for a raster with both an alpha band and a nodata value,
    and for some of a raster's bands (`bands`) masked by a nodata value: a pixel holds data when one of
    those bands does (GDAL's dataset mask asks every band, so --bands 1 classified pixels that are nodata
    in band 1 from its fill value, because bands 2 and 3 held data there).

    There GDAL lets the nodata value shadow the alpha band, and rasterio then takes the alpha band's own
    nodata mask: with nodata 255 every opaque pixel (alpha 255) would be masked and only the transparent
    ones segmented; with nodata 0, pixels of the nodata colour would be kept. Such a pixel holds data when
    it is not transparent (alpha above 0) and not the nodata value in every colour band.
    """
    alpha = [i + 1 for i, interp in enumerate(ds.colorinterp) if interp == ColorInterp.alpha]
    chosen = sorted(set(bands or ()))
    if not alpha and chosen and chosen != list(range(1, ds.count + 1)) and all(
            ds.mask_flag_enums[band - 1] == [MaskFlags.nodata] for band in chosen):
        valid = np.zeros(shape, bool)
        for band in chosen:
            valid |= ds.read_masks(band, window=window, out_shape=shape, resampling=Resampling.nearest) > 0
        return valid.astype(np.uint8) * 255
    if not alpha or ds.nodata is None:
        return ds.dataset_mask(window=window, out_shape=shape, resampling=Resampling.nearest)
    read = {"window": window, "out_shape": shape, "resampling": Resampling.nearest}
    colour = np.zeros(shape, bool)
    with warnings.catch_warnings():  # rasterio's note on the shadowing, which this function resolves
        warnings.simplefilter("ignore", NodataShadowWarning)
        for band in range(1, ds.count + 1):
            if band not in alpha:
                colour |= ds.read_masks(band, **read) > 0
    opaque = ds.read(alpha[0], **read) > 0
    return (colour & opaque).astype(np.uint8) * 255


def all_pixels_valid(ds: rasterio.io.DatasetReader) -> bool:
    """No nodata, alpha or mask band: every pixel is valid (NaN in a float band aside)."""
    return all(flags == [MaskFlags.all_valid] for flags in ds.mask_flag_enums)


def _sample(ds: rasterio.io.DatasetReader, bands: list[int],
            values: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """A decimated read of the whole raster (uses overviews where present): the values of `bands`
    (None unless `values`) and the validity mask: the dataset mask, and in a float band NaN and +-inf are
    never valid, whether or not a nodata value says so (as RasterSource.read masks them in every window).

    Without overviews GDAL decompresses every block for it, which on a large raster costs more than
    segmenting a small extent of it: when neither the values (an 8-bit raster, or a value range
    given) nor the mask (no nodata, alpha or mask band) are needed, nothing is read: a float raster read with
    a value range is then not sampled for NaN either, and one holding only NaN is refused by the run's own
    reads (segment, classify, an index build). Damaged blocks are likewise found by the run's own reads,
    with the same sentence and nothing written.
    """
    factor = max(1.0, max(ds.width, ds.height) / SAMPLE_SIDE)
    shape = (max(1, int(ds.height / factor)), max(1, int(ds.width / factor)))
    all_valid = all_pixels_valid(ds)
    unique = sorted(set(bands))
    floats = any(not np.issubdtype(np.dtype(ds.dtypes[band - 1]), np.integer) for band in unique)
    if all_valid and not values:
        return None, np.ones(shape, bool)
    try:
        data = (ds.read(unique, out_shape=(len(unique), *shape), resampling=Resampling.nearest)
                if values else None)
        mask = np.ones(shape, bool) if all_valid else validity_mask(ds, shape, bands=bands) > 0
    except RasterioError as exc:
        raise unreadable_pixels(ds.name, exc) from exc
    if floats and data is not None:
        mask &= np.isfinite(data).all(axis=0)
    return (data if values else None), mask


def needs_stretch(ds: rasterio.io.DatasetReader, bands: list[int]) -> bool:
    """Whether the values are stretched by a percentile range (every type but 8-bit)."""
    return np.dtype(ds.dtypes[bands[0] - 1]) != np.uint8


def stretch_range(ds: rasterio.io.DatasetReader, bands: list[int],
                  data: np.ndarray, mask: np.ndarray) -> list[tuple[float, float]] | None:
    """Per-band 2-98 percentile range for non-8-bit rasters (None: use values as they are)."""
    if not needs_stretch(ds, bands):
        return None
    unique = sorted(set(bands))
    ranges = []
    for band in bands:
        values = data[unique.index(band)][mask]
        values = values[np.isfinite(values)]
        if values.size == 0:
            ranges.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(values, [2, 98])
        # A fill value is one huge value, the lowest or highest, over at least 2 % of the pixels (a ramp of
        # huge values is data).
        sentinel = next((float(v) for v, end in ((lo, values.min()), (hi, values.max()))
                         if abs(v) >= SENTINEL and v == end and np.count_nonzero(values == v) >= 0.02 * values.size),
                        None)
        if sentinel is not None:  # the stretch would map every real value onto one end: one class everywhere
            raise InputError(f"Band {band} of {Path(ds.name).name} holds {sentinel:.8g} in more than 2 % of its "
                             "pixels, a fill value (ESRI's float nodata is -3.4028235e+38) that no nodata tag marks "
                             f"as empty; set it (gdal_edit.py -a_nodata {sentinel:.8g} FILE) or give --value-range "
                             "MIN MAX.")
        ranges.append((float(lo), float(hi) if hi > lo else float(lo) + 1.0))
    return ranges


SENTINEL = 1e30  # values this large are fill values, not measurements


def processing_scale(ds: rasterio.io.DatasetReader, scale: float | None, gsd_m: float | None,
                     square: bool = True) -> tuple[float, float]:
    """Factors from native pixels to processing pixels (2.0 = twice as many pixels), across the columns
    and down the rows: a --gsd gives square pixels of that size on the ground, whatever shape the
    raster's own pixels have there (degrees away from the equator, 2 x 5 m pixels). Not `square`: the
    pixels' width is `gsd_m` and their shape the raster's own (one factor: a fine-tuned model trained on
    its raster's own grid, whose recorded resolution is its pixels' width; trained_resolution)."""
    check_scale_or_gsd(scale, gsd_m)
    if scale is not None:
        return float(scale), float(scale)
    if gsd_m is None:
        return 1.0, 1.0
    natives = native_ground_size(ds)
    factors = (natives[0] / gsd_m, natives[1] / gsd_m if square else natives[0] / gsd_m)
    if not all(MIN_SCALE <= factor <= MAX_SCALE for factor in factors):
        larger, smaller = max(natives), min(natives)
        pixels = (f"{natives[0]:.3g} m" if math.isclose(*natives, rel_tol=1e-3) else
                  f"{natives[0]:.3g} x {natives[1]:.3g} m")
        by = max(factors, key=lambda f: max(f / MAX_SCALE, MIN_SCALE / f))
        raise InputError(f"--gsd {gsd_m:g} would resample this raster's {pixels} pixels by {by:.3g}; "
                         f"the engine resamples by {MIN_SCALE:g} to {MAX_SCALE:g}, so give a --gsd between "
                         f"{larger / MAX_SCALE:.3g} and {smaller / MIN_SCALE:.3g} m.")
    return float(factors[0]), float(factors[1])


DEGREE_M = 111_320.0  # metres of a degree of latitude, and of longitude at the equator (mean, to 0.7 %)


def pixel_size(transform: Affine) -> list[float]:
    """[width, height] of a pixel in CRS units, positive, for any grid (south-up, rotated)."""
    return [math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)]


def _axis_unit_factor(crs: CRS) -> float | None:
    """Metres per unit of a CRS's first axis when it names a linear unit (e.g. a site grid in metres)."""
    try:
        converted = as_pyproj(crs)
        axes = converted.axis_info if converted is not None else []
    except Exception:  # pyproj raises several types for CRSs it cannot read
        return None
    if not axes or not axes[0].unit_conversion_factor:
        return None
    name = axes[0].unit_name.lower()
    linear = any(word in name for word in ("metre", "meter", "foot", "feet", "yard", "mile", "chain", "link"))
    return float(axes[0].unit_conversion_factor) if linear else None


def native_gsd_m(ds: rasterio.io.DatasetReader) -> float:
    """The raster's pixel width on the ground in metres, at the raster's centre (native_ground_size)."""
    return native_ground_size(ds)[0]


def native_ground_size(ds: rasterio.io.DatasetReader) -> tuple[float, float]:
    """(width, height) in metres of the raster's centre pixel on the ground: through the latitude in a
    geographic CRS (its unit taken to degrees first: EPSG:4807's are grads); in a projected one the CRS
    unit, or, where the projection's areas are more than 1 % off the ground (Web Mercator away from the
    equator: see ground.py), with the pixel's ellipsoidal area (its shape kept: such projections are
    conformal)."""
    width, height = pixel_size(ds.transform)
    if ds.crs.is_geographic:
        degrees = degrees_per_unit(ds.crs)
        lat = (ds.bounds.top + ds.bounds.bottom) / 2 * degrees
        return width * degrees * DEGREE_M * math.cos(math.radians(lat)), height * degrees * DEGREE_M
    try:
        units = ds.crs.linear_units_factor[1]
    except CRSError:  # a local (engineering) CRS: its axes may still name their unit
        units = _axis_unit_factor(ds.crs)
    if units is None:
        raise InputError(f"The raster's CRS ({ds.crs.to_string()[:80]}) has no known ground unit (a local or "
                         "engineering CRS), so a ground resolution cannot be set; resample with --scale "
                         "instead of --gsd.") from None
    col, row = ds.width // 2, ds.height // 2
    centre_x, centre_y = ds.transform @ (col + 0.5, row + 0.5)
    if not keeps_areas(ds.crs, centre_x, centre_y)[0]:
        ground = ground_pixel_size(ds.crs, ds.transform, col, row)
        if ground is not None:
            factor = ground / math.sqrt(width * height)
            return width * factor, height * factor
    return width * units, height * units


def open_source(path: str | Path, bands: list[int] | None = None, scale: float | None = None,
                gsd_m: float | None = None,
                value_range: tuple[float, float] | None = None, square: bool = True,
                task: str = "segment") -> RasterSource:
    """Open and prepare a raster for reading; raises InputError/EmptyResultError with sentences.
    (`square`: how `gsd_m` resamples, processing_scale; `task`: what the caller does with it, for the
    sentence of an all-nodata raster: "there is nothing to {task}".)"""
    ds = open_dataset(path)
    try:
        band_list = select_bands(ds, bands)
        palette = palette_lut(ds, band_list)  # a paletted band shows its colours, chosen or not
        factor_x, factor_y = processing_scale(ds, scale, gsd_m, square)
        stretch = value_range is None and needs_stretch(ds, band_list)
        data, mask = _sample(ds, band_list, values=stretch)
        if not mask.any():
            if any(not np.issubdtype(np.dtype(ds.dtypes[band - 1]), np.integer) for band in band_list):
                raise nothing_valid(path, True, task)  # the sentence that names NaN, as segment's reads give it
            raise EmptyResultError(f"Every pixel of {path} is nodata or masked: there is nothing to "
                                   f"{task}. Check the raster's nodata value and alpha band.")
        ranges: list[tuple[float, float]] | None
        if value_range is not None:
            check_value_range(value_range)
            low, high = value_range
            ranges = [(float(low), float(high))] * 3
        elif data is not None:
            ranges = stretch_range(ds, band_list, data, mask)
        else:
            ranges = None
    except Exception:
        ds.close()
        raise
    return RasterSource(Path(path), ds, band_list, factor_x, None if palette is not None else ranges, palette,
                        factor_y)


# What a user may type for the longitude/latitude CRS of GeoJSON and web maps, besides OGC:CRS84 itself.
CRS84_NAMES = ("crs84", "crs:84", "ogc:crs84")


def crs_text(value: str | int) -> str:
    """A CRS as typed, with the short forms spelt out: an EPSG code alone (26914, as a number or text) is
    EPSG:26914, CRS84 is OGC:CRS84 (longitude, latitude on WGS 84). Anything else is returned as it is."""
    if not isinstance(value, str):
        return f"EPSG:{int(value)}"
    text = value.strip()
    if text.isascii() and text.isdigit():
        return f"EPSG:{int(text)}"
    if text.lower() in CRS84_NAMES:
        return "OGC:CRS84"
    return value


def parse_crs(text: str | int | None, default: CRS, what: str = "bbox CRS") -> CRS:
    """A CRS the user typed (EPSG:n, an EPSG code alone, CRS84, WKT, PROJ string), or `default` when none;
    InputError naming `what`. A CRS with no horizontal x and y (a vertical CRS such as EPSG:5703, a geocentric
    one such as EPSG:4978) is refused: no box or point on the ground is given in it.

    Parsed inside a rasterio environment, whose error handler turns GDAL's and PROJ's complaints into
    the exception: outside one, PROJ prints its own line ("ERROR 1: PROJ: ... crs not found") beside ours.
    Every refusal is the same sentence: rasterio raises CRSError for most text, but a plain ValueError for
    EPSG: followed by no whole number (EPSG:x, EPSG:4326.5) and UnicodeEncodeError for text that is not UTF-8
    (a terminal's Latin-1 byte); both are ValueErrors, as CRSError is.
    """
    if text is None or text == "":
        return default
    typed = crs_text(text)
    try:
        with rasterio.Env():
            crs = CRS.from_user_input(typed)
    except ValueError as exc:  # CRSError, and the ValueErrors above
        raise InputError(f"The {what} {shown(str(text))} is not a CRS I know; use e.g. EPSG:4326 or a WKT "
                         "string.") from exc
    kind = _not_horizontal(crs)
    if kind is not None:
        raise InputError(f"The {what} {shown(str(text))} is {kind}, not a horizontal 2-D CRS: its "
                         "coordinates are no x and y on the ground. Use a geographic or projected CRS, e.g. "
                         "EPSG:4326 or the raster's own.")
    return crs


def _not_horizontal(crs: CRS) -> str | None:
    """What a CRS without horizontal coordinates is ("a vertical CRS", "a geocentric CRS"), or None for a
    geographic, projected, compound (its horizontal part) or other CRS."""
    try:
        parsed = as_pyproj(crs)
    except Exception:  # pyproj raises several types for definitions it cannot read; rasterio read this one
        return None
    if parsed is None:
        return None
    for kind, found in (("vertical", parsed.is_vertical), ("geocentric", parsed.is_geocentric),
                        ("temporal", "temporal" in parsed.type_name.lower())):
        if found:
            return f"a {kind} CRS ({parsed.name})"
    return None


def pixel_envelope(transform: Affine, col0: float, row0: float, col1: float, row1: float
                   ) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) in CRS units of the pixel rectangle [col0, col1) x [row0, row1)."""
    xs, ys = zip(*(transform @ corner for corner in ((col0, row0), (col1, row0), (col0, row1), (col1, row1))))
    return min(xs), min(ys), max(xs), max(ys)


def bounds_window(source: RasterSource, bounds: tuple[float, float, float, float]) -> PixelWindow | None:
    """The processing-grid pixels under the box (xmin, ymin, xmax, ymax) in the raster's CRS, clipped to
    the raster; None when they do not overlap. Any affine: north-up, south-up or rotated (the box's four
    corners are mapped onto the grid)."""
    xmin, ymin, xmax, ymax = bounds
    inverse = ~source.transform
    cols, rows = zip(*(inverse @ corner for corner in ((xmin, ymin), (xmin, ymax), (xmax, ymin), (xmax, ymax))))
    row0 = max(0, math.floor(min(rows) + 1e-6))
    col0 = max(0, math.floor(min(cols) + 1e-6))
    row1 = min(source.height, math.ceil(max(rows) - 1e-6))
    col1 = min(source.width, math.ceil(max(cols) - 1e-6))
    if row1 <= row0 or col1 <= col0:
        return None
    return PixelWindow(row0, col0, row1 - row0, col1 - col0)


def coordinates(crs: CRS | None, *values: float, point: bool = False) -> str:
    """Coordinates for a sentence: fixed-point (never 5.2e+06), to the centimetre in a projected CRS and
    to about a decimetre (6 decimals) in degrees; a range (two values) joined by '..', a `point`'s
    coordinates by ', '."""
    digits = 6 if crs is not None and crs.is_geographic else 2
    text = [f"{value:.{digits}f}" for value in values]
    return ", ".join(text) if point or len(values) != 2 else "..".join(text)


SAMPLES = 21  # points per side of the grids sampled to check that a box and a raster meet
HUGE = 1000.0  # a box whose envelope in the raster's CRS is this many raster sides across is suspect


def _transformed_envelope(box: tuple[float, float, float, float], source_crs: CRS,
                          target_crs: CRS) -> tuple[float, float, float, float]:
    """GDAL's envelope of `box` in `target_crs` (its sides densified; a pole inside the box is reached; across
    the antimeridian of a geographic target xmin > xmax). InputError when it does not transform."""
    try:
        with np.errstate(all="ignore"):
            envelope = transform_bounds(source_crs, target_crs, *box, densify_pts=SAMPLES)
    except Exception as exc:  # pyproj/GDAL raise several types for impossible transforms
        raise InputError(f"The bbox cannot be placed on the raster: PROJ knows no way from the bbox's CRS "
                         f"{crs_label(source_crs)} to the raster's CRS {crs_label(target_crs)}"
                         f"{unplaced(target_crs, '--bbox-crs')}") from exc
    if not all(map(math.isfinite, envelope)):
        raise InputError(f"The bbox lies outside the area where {crs_label(source_crs)} can be transformed to the "
                         f"raster's CRS {crs_label(target_crs)}.")
    return envelope


def unplaced(crs: CRS, option: str) -> str:
    """The end of a sentence saying why a place given with another CRS (named by `option`) cannot be put into
    the raster's `crs`, and what to do instead."""
    try:
        converted = as_pyproj(crs)
        local = converted is not None and converted.is_engineering
    except Exception:  # pyproj raises several types for CRSs it cannot read
        local = False
    if local:
        return (", a local (engineering) CRS that is not tied to the earth. Give the coordinates in the raster's "
                f"own CRS (leave out {option}).")
    return ". Give the coordinates in the raster's own CRS, or in one that PROJ can transform to it."


def longitude_turn(crs: CRS) -> float:
    """A whole turn of longitude in a geographic CRS's unit: 360 degrees, 400 grads (EPSG:4807)."""
    return 360.0 / degrees_per_unit(crs)


def x_turn(crs: CRS) -> float | None:
    """The distance in x, in the CRS's unit, after which x comes back to the same places: a whole turn of
    longitude in a geographic CRS (longitude_turn); in a cylindrical projection over the whole world (Web
    Mercator, EPSG:3857: 40075016.69 m; plate carree, cylindrical equal area) the equator's length, x being the
    longitude scaled; None for any other CRS (UTM, a rotated or local grid, Mollweide, whose x at the antimeridian
    depends on the latitude). A raster past such a CRS's edge (EPSG:3857 x beyond 20037508.34) holds the places
    of the other side."""
    if crs.is_geographic:
        return longitude_turn(crs)
    try:
        return _projected_x_turn(crs.to_wkt())
    except Exception:  # a CRS pyproj cannot read has no turn
        return None


@functools.lru_cache(maxsize=32)
def _projected_x_turn(wkt: str) -> float | None:
    from pyproj import Transformer

    crs = as_pyproj(wkt)
    if crs is None or not crs.is_projected or crs.geodetic_crs is None:
        return None
    step = 0.5
    lons = np.arange(-180.0, 180.0 + step / 2, step)
    to_xy = Transformer.from_crs(crs.geodetic_crs, crs, always_xy=True)
    turns = []
    for lat in (0.0, 30.0, -30.0, 60.0):
        with np.errstate(all="ignore"):
            xs, ys = (np.asarray(v, float) for v in to_xy.transform(lons, np.full_like(lons, lat)))
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            return None
        steps = np.diff(xs)
        usual = float(np.median(steps))
        turn = abs(usual) * 360.0 / step
        # x proportional to the longitude (but for one jump back at the projection's own antimeridian), y the
        # same all along the parallel: a cylindrical projection.
        if turn <= 0 or np.count_nonzero(np.abs(steps - usual) > 1e-6 * abs(usual)) > 1 \
                or np.ptp(ys) > 1e-9 * turn:
            return None
        turns.append(turn)
    return turns[0] if max(turns) - min(turns) <= 1e-9 * turns[0] else None


def longitude_on(x: float, left: float, right: float, turn: float = 360.0) -> float:
    """Longitude `x` moved by whole turns onto a raster's longitudes [left, right] where it falls there (-159.85
    on a raster over 200..200.4 is 200.15; -179.9 on one across the antimeridian, 179.8..180.2, is 180.1); else
    `x` as it was. The bbox's longitudes are moved the same way (_longitude_parts)."""
    moved = left + (x - left) % turn
    return moved if moved <= right else x


def _longitude_parts(span: tuple[float, float], raster: tuple[float, float],
                     turn: float = 360.0) -> list[tuple[float, float]]:
    """Longitudes [west, east] (east may exceed 180, or lie west of `west` across the antimeridian) as the
    parts that fall on the raster's longitudes [left, right], counted in whole turns either way (a raster in
    0..360 and a box in -180..180, or back): two where the box crosses the raster's own edge (a world raster
    and a box across 180), none when no part does. `turn`: a whole turn in the CRS's unit (longitude_turn)."""
    west, east = span
    if east < west:
        east += turn
    if east - west >= turn:
        return [raster]
    parts = [(max(west + moved, raster[0]), min(east + moved, raster[1])) for moved in (-turn, 0.0, turn)]
    return [(a, b) for a, b in parts if a < b]


def _envelope(boxes: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float, float] | None:
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _samples_in(box: tuple[float, float, float, float], source_crs: CRS, target: tuple[float, float, float, float],
                target_crs: CRS) -> np.ndarray:
    """Which points of a SAMPLES x SAMPLES grid over `box` (its edges included) land inside `target` once
    transformed (a point that does not transform lands nowhere)."""
    from pyproj import Transformer

    t = np.linspace(0.0, 1.0, SAMPLES)
    xs, ys = np.meshgrid(box[0] + (box[2] - box[0]) * t, box[1] + (box[3] - box[1]) * t)
    with np.errstate(all="ignore"):
        to_target = Transformer.from_crs(as_pyproj(source_crs), as_pyproj(target_crs), always_xy=True)
        xs, ys = (np.asarray(v, float) for v in to_target.transform(xs.ravel(), ys.ravel()))
        turn = x_turn(target_crs)
        if turn:  # a longitude (or a cylindrical projection's x) a whole turn away is the same place
            xs = target[0] + np.mod(xs - target[0], turn)
        return (xs >= target[0]) & (xs <= target[2]) & (ys >= target[1]) & (ys <= target[3])


def _samples_inside(box: tuple[float, float, float, float], source_crs: CRS, target: tuple[float, float, float, float],
                    target_crs: CRS) -> bool:
    """Whether any point of a SAMPLES x SAMPLES grid over `box` lands inside `target` once transformed."""
    return bool(_samples_in(box, source_crs, target, target_crs).any())


def bbox_parts_in_raster_crs(bbox: tuple[float, float, float, float], bbox_crs: CRS, raster_crs: CRS,
                             raster_box: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """The part of a box (given in `bbox_crs`) over the raster, in the raster's CRS, as boxes: more than one where
    a box in degrees crosses the antimeridian of a raster in degrees that reaches it from both sides (a world
    raster: the box's two strips, at its west and east edges); none when they do not meet.

    GDAL transforms the box's densified outline and reaches a pole inside it. In a geographic raster the box
    may cross the antimeridian, and longitudes in -180..180 and 0..360 are the same places. A box whose
    envelope comes out enormous (around the pole a projection cannot place, e.g. the South Pole against a
    north polar stereographic raster) must meet the raster in sampled points, one way or the other. A box in
    degrees that crosses 180 or is a whole turn wide (a QGIS canvas zoomed out to -315..315) is transformed in
    parts within -180..180: GDAL's envelope of such a box missed most of the world."""
    if bbox_crs == raster_crs or not bbox_crs.is_geographic:
        return _boxes_over_raster(bbox, bbox_crs, raster_crs, raster_box)
    if _holds_raster(bbox, bbox_crs, raster_crs, raster_box):  # the envelope of a box to a pole went astray
        return [raster_box]
    return [box for part in _within_one_turn(bbox, longitude_turn(bbox_crs))
            for box in _boxes_over_raster(part, bbox_crs, raster_crs, raster_box)]


def _holds_raster(box: tuple[float, float, float, float], box_crs: CRS, raster_crs: CRS,
                  raster_box: tuple[float, float, float, float]) -> bool:
    """Whether a longitude/latitude box holds the whole raster: every point of a SAMPLES x SAMPLES grid over the
    raster (its edges included) lands inside it. GDAL's envelope of a box reaching both poles (the world,
    -180 -90 180 90) in a transverse Mercator CRS came out as the zone's western half, and a raster east of
    its central meridian was said to lie outside the world."""
    try:
        return bool(_samples_in(raster_box, raster_crs, box, box_crs).all())
    except Exception:  # pyproj raises several types for impossible transforms: the usual way decides
        return False


def _within_one_turn(box: tuple[float, float, float, float],
                     turn: float = 360.0) -> list[tuple[float, float, float, float]]:
    """A longitude/latitude box as boxes within longitudes -180..180 (half a `turn` either way, in the CRS's
    unit): the whole turn when it is 360 degrees wide or more, two boxes when it crosses 180, else the box
    moved by whole turns."""
    xmin, ymin, xmax, ymax = box
    half = turn / 2
    if xmax - xmin >= turn:
        return [(-half, ymin, half, ymax)]
    west = (xmin + half) % turn - half
    east = west + (xmax - xmin)
    if east <= half:
        return [(west, ymin, east, ymax)]
    return [(west, ymin, half, ymax), (-half, ymin, east - turn, ymax)]


def _boxes_over_raster(bbox: tuple[float, float, float, float], bbox_crs: CRS, raster_crs: CRS,
                       raster_box: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """bbox_parts_in_raster_crs for one box (within one turn of longitudes when `bbox_crs` is geographic)."""
    box = bbox if bbox_crs == raster_crs else _transformed_envelope(bbox, bbox_crs, raster_crs)
    xmin, ymin, xmax, ymax = box
    spans = [(xmin, xmax)]
    turn = x_turn(raster_crs)
    if turn:  # a raster in degrees, or in Web Mercator past 180 degrees east, meets the box a turn away
        spans = _longitude_parts((xmin, xmax), (raster_box[0], raster_box[2]), turn)
    width, height = raster_box[2] - raster_box[0], raster_box[3] - raster_box[1]
    found = []
    for west, east in spans:
        part = (west, ymin, east, ymax)
        if not _overlap(part, raster_box):
            continue
        enormous = (east - west) > HUGE * width or (ymax - ymin) > HUGE * height
        if bbox_crs != raster_crs and enormous and not (
                _samples_inside(bbox, bbox_crs, raster_box, raster_crs)
                or _samples_inside(raster_box, raster_crs, bbox, bbox_crs)):
            continue
        found.append(part)
    return found


def is_rotated(transform) -> bool:
    """Whether the grid is turned (or sheared) against the CRS's axes: its pixels are not axis-aligned boxes."""
    return bool(transform.b or transform.d)


def raster_corners(transform, width: int, height: int) -> list[tuple[float, float]]:
    """The raster's four corners on the ground (top-left, top-right, bottom-right, bottom-left pixel corners)."""
    return [tuple(transform @ corner) for corner in ((0, 0), (width, 0), (width, height), (0, height))]


def raster_footprint(transform, width: int, height: int) -> shapely.Polygon:
    """The raster's footprint on the ground: a rectangle north-up, a turned quadrilateral on a rotated grid."""
    return shapely.orient_polygons(shapely.Polygon(raster_corners(transform, width, height)))


def corner_text(crs, corners: list[tuple[float, float]]) -> str:
    return ", ".join(f"({coordinates(crs, x, y, point=True)})" for x, y in corners)


def outside_bbox_sentence(name: str, transform, width: int, height: int, crs) -> str:
    """Where the raster is, for a bbox that misses it: its envelope, or on a rotated grid its footprint's
    corners (a box inside the envelope can miss a turned footprint)."""
    if is_rotated(transform):
        return (f"The bbox does not overlap the raster {name}: its grid is rotated, and its footprint has the "
                f"corners {corner_text(crs, raster_corners(transform, width, height))} in {crs_label(crs)}.")
    left, bottom, right, top = pixel_envelope(transform, 0, 0, width, height)
    return (f"The bbox does not overlap the raster {name}: the raster covers x {coordinates(crs, left, right)}, "
            f"y {coordinates(crs, bottom, top)} in {crs_label(crs)}.")


def request_window(source: RasterSource, bbox: tuple[float, float, float, float] | None,
                   bbox_crs: str | None = None, clip: bool = False) -> PixelWindow:
    """The processing-grid window covering bbox (in bbox_crs, default the raster's), clipped to the raster.

    With `clip`, a rotated grid's source also takes the box as its `clip` (the window is the box's envelope
    in pixels, which reaches far beyond the box): what is outside the box gets no class."""
    window, parts = _request(source, bbox, bbox_crs)
    if clip and parts and (is_rotated(source.transform) or len(parts) > 1):
        # A rotated grid's window is the box's envelope in pixels; a box across the antimeridian of a world
        # raster spans its whole width: what lies outside the box (its parts) gets no class.
        source.clip = tuple(parts)
    return window


def request_windows(source: RasterSource, bbox: tuple[float, float, float, float] | None,
                    bbox_crs: str | None = None) -> list[PixelWindow]:
    """The processing-grid windows under the bbox's parts (request_window's window without a bbox): two strips,
    at the raster's west and east edges, for a box across the antimeridian of a world raster, where
    request_window's one window is the whole width between them. The same refusals as request_window's."""
    window, parts = _request(source, bbox, bbox_crs)
    if not parts:
        return [window]
    found = [w for w in (bounds_window(source, part) for part in parts) if w is not None]
    return found or [window]


def _request(source: RasterSource, bbox: tuple[float, float, float, float] | None,
             bbox_crs: str | None) -> tuple[PixelWindow, list[tuple[float, float, float, float]]]:
    """request_window's window and the bbox's parts in the raster's CRS (none without a bbox)."""
    full = PixelWindow(0, 0, source.height, source.width)
    if bbox is None:
        if bbox_crs:  # a forgotten --bbox would otherwise run the whole raster without a word
            raise InputError(f"--bbox-crs {bbox_crs} says which CRS the --bbox is in, and no --bbox was given; "
                             "add --bbox XMIN YMIN XMAX YMAX, or leave --bbox-crs out.")
        return full, []
    check_bbox(bbox)
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    crs = parse_crs(bbox_crs, source.crs)
    quarter = longitude_turn(crs) / 4 if crs.is_geographic else 0.0  # 90 degrees, 100 grads
    if crs.is_geographic and not (-quarter <= ymin and ymax <= quarter and -4 * quarter <= xmin
                                  and xmax <= 4 * quarter):
        raise InputError(f"The bbox {list(bbox)} is not in the range of {crs_label(crs)}: latitudes lie between "
                         f"{-quarter:g} and {quarter:g}, longitudes between {-2 * quarter:g} and {2 * quarter:g}. "
                         "Check the order (XMIN YMIN XMAX YMAX) and --bbox-crs.")
    raster_box = pixel_envelope(source.transform, 0, 0, source.width, source.height)
    parts = bbox_parts_in_raster_crs((xmin, ymin, xmax, ymax), crs, source.crs, raster_box)
    box = _envelope(parts)
    window = bounds_window(source, box) if box is not None else None
    if window is None:
        raise OutsideBboxError(outside_bbox_sentence(source.path.name, source.transform, source.width, source.height,
                                                     source.crs))
    return window, parts
