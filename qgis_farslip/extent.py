"""Extents and rasters for a request: CRS handling and local copies of non-file layers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable, NamedTuple

from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterDataProvider,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
)

from .filenames import safe_file_stem
from .jobs import PreparationError
from .settings import plugin_cache_dir

# A WMS/XYZ layer has no pixel size of its own; it is fetched at the canvas's resolution, within reason.
MAX_EXPORT_SIDE_PX = 8192


class LocalCopyError(PreparationError):
    """The layer cannot be handed to the backend as it is shown; the message says why and what to do."""


def whole_web_layer_text(layer_name: str, instead: str) -> str:
    """The refusal of a WMS/XYZ layer's whole extent (often the whole world): it is copied for the backend at the
    map's resolution, so only an area of it can be; `instead` says how to give one."""
    return (f"The layer {layer_name} is a web map (WMS/XYZ): its whole extent cannot be copied for the backend; "
            f"{instead}")


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """What the backend's bbox_crs takes: 'EPSG:xxxx', or WKT for a CRS without an authority id."""
    return crs.authid() or crs.toWkt(QgsCoordinateReferenceSystem.WktVariant.WKT_PREFERRED)


def transform_extent(extent: QgsRectangle, source_crs: QgsCoordinateReferenceSystem,
                     target_crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """The bounding box of `extent` (densified edges) in another CRS.

    Raises QgsCsException where the rectangle has no image in `target_crs` (an empty canvas, a view beyond
    the CRS's area of use).
    """
    if source_crs == target_crs:
        return QgsRectangle(extent)
    transform = QgsCoordinateTransform(source_crs, target_crs, QgsProject.instance())
    return transform.transformBoundingBox(extent)


def gdal_dataset_name(layer: QgsRasterLayer) -> str | None:
    """What GDAL opens for a `gdal` layer: a file, a /vsi path or a driver's subdataset (NETCDF:..., GPKG:...)."""
    if layer.providerType() != "gdal":
        return None
    return layer.source().split("|", 1)[0]


def crs_overridden(layer: QgsMapLayer) -> bool:
    """The layer's (raster or vector) CRS is not the file's own: set in QGIS (Layer > Set CRS), or the file has none."""
    return layer.crs() != layer.dataProvider().crs()


# A band's nodata in a copy for the backend: a value, or None for none (every pixel of the band is data).
BandNodata = float | None


def same_nodata(first: BandNodata, second: BandNodata) -> bool:
    if first is None or second is None:
        return first is second
    return first == second or (math.isnan(first) and math.isnan(second))


def nodata_overridden(layer: QgsRasterLayer) -> tuple[BandNodata, ...] | None:
    """Per band, the nodata of what QGIS shows, where it is not the file's own: an 'Additional no data value'
    set in QGIS (Layer Properties > Transparency), or the file's own switched off ('No data value' unticked).
    None where QGIS uses the file's nodata as it is.

    LocalCopyError where QGIS's nodata is not one value per band (a range, or a value beside the file's own),
    which a raster file cannot carry: the backend would classify pixels that QGIS shows as transparent."""
    provider = layer.dataProvider()
    if provider is None or layer.providerType() != "gdal":
        return None
    values: list[BandNodata] = []
    overridden = False
    for band in range(1, provider.bandCount() + 1):
        own = float(provider.sourceNoDataValue(band)) if provider.sourceHasNoDataValue(band) else None
        shown: list[float] = [own] if own is not None and provider.useSourceNoDataValue(band) else []
        for value_range in provider.userNoDataValues(band):
            low, high = float(value_range.min()), float(value_range.max())
            if not same_nodata(low, high):
                raise LocalCopyError(
                    f"Layer {layer.name()} has a range of no data values set in QGIS (band {band}: {low:g} to "
                    f"{high:g}); the backend reads one no data value per band. Set a single value in Layer "
                    "Properties > Transparency, or save the layer with its no data (Export > Save As...) and "
                    "use that.")
            if not any(same_nodata(low, value) for value in shown):
                shown.append(low)
        if len(shown) > 1:
            raise LocalCopyError(
                f"Layer {layer.name()} has more than one no data value in band {band} "
                f"({', '.join(f'{value:g}' for value in shown)}: the file's own and one set in QGIS); the backend "
                "reads one per band. Keep one in Layer Properties > Transparency, or save the layer with its no "
                "data (Export > Save As...) and use that.")
        value = shown[0] if shown else None
        overridden = overridden or not same_nodata(value, own)
        values.append(value)
    return tuple(values) if overridden else None


def local_raster_path(layer: QgsRasterLayer) -> str | None:
    """The GDAL file behind the layer when the backend sees in it what QGIS shows: a plain local file whose own
    CRS and nodata are the layer's. None otherwise (see `needs_vrt` and `write_vrt` for a copy the backend can
    read; a nodata QGIS cannot hand over is refused there)."""
    name = gdal_dataset_name(layer)
    if name is None or not os.path.isfile(name) or crs_overridden(layer):
        return None
    try:
        if nodata_overridden(layer) is not None:
            return None
    except LocalCopyError:
        return None
    return name


def missing_file_text(dataset: str, layer_name: str) -> str:
    """The sentence for a GDAL dataset whose local file (a GeoTIFF, the GeoPackage of a raster table, the zip of a
    /vsizip/ member) is gone, deleted or moved since the layer was loaded; "" while it is there, and for a name
    that is not a local file (a /vsicurl/ URL, a driver's NETCDF:"..." name: GDAL judges those)."""
    path = QgsProviderRegistry.instance().decodeUri("gdal", dataset).get("path") or ""
    if not os.path.isabs(path) or path.startswith("/vsi") or os.path.exists(path):
        return ""
    return (f"The file {path} of layer {layer_name} no longer exists; remove the layer or point it to the moved "
            "file.")


def missing_layer_file(layer: QgsRasterLayer) -> str:
    """`missing_file_text` of a layer of the gdal provider ("" for any other)."""
    name = gdal_dataset_name(layer)
    return missing_file_text(name, layer.name()) if name is not None else ""


def unusable_layer_text(layer: QgsRasterLayer) -> str:
    """Why the backend cannot be handed the layer as QGIS has it, "" when it can: its file is gone
    (`missing_layer_file`), or it has no CRS in QGIS. The check every entry point (the Segment, Search and Train
    tabs, the Processing algorithms) makes before it hands the layer to the backend."""
    missing = missing_layer_file(layer)
    if missing:
        return missing
    if not layer.crs().isValid():  # the backend would ask for georeferencing, which a file with a world file has
        return (f"The layer {layer.name()} has no coordinate reference system (CRS) in QGIS. If the file is "
                "georeferenced (a world file, or coordinates without a CRS), choosing its CRS with Layer > Set CRS "
                "is enough: then run again. An image without coordinates must be georeferenced first (Raster > "
                "Georeferencer).")
    return ""


def needs_vrt(layer: QgsRasterLayer) -> bool:
    """A GDAL layer the backend cannot read as is (not a plain file, or another CRS than the file's)."""
    return gdal_dataset_name(layer) is not None and local_raster_path(layer) is None


# A window of a raster's own pixels: column and row of its top left pixel, width and height (gdal_translate -srcwin).
PixelWindow = tuple[int, int, int, int]

# The VRTs of layers are kept between runs (see `vrt_path`); those not used for this long, and the least recently
# used beyond this many, are removed whenever a VRT is written.
VRT_CACHE_MAX_FILES = 100
VRT_CACHE_MAX_AGE_S = 30 * 24 * 3600
DRAFT_MAX_AGE_S = 24 * 3600  # a draft left by a crash


# vrt_path's names: a stem, '-', 20 hex digits of the key's sha256.
KEPT_VRT_NAME = re.compile(r"[^.].*-[0-9a-f]{20}\.vrt")


def vrt_cache_dir() -> str:
    return os.path.join(plugin_cache_dir(), "layer-vrt")


def vrt_path(source: str, srs: str | None, window: PixelWindow | None = None,
             nodata: tuple[BandNodata, ...] | None = None) -> str:
    """Where the VRT of the GDAL dataset `source` (with the CRS `srs` assigned, cut to `window`) lives: one file
    per (source, srs, window) in the plugin's cache folder, the same on every run and in every QGIS session.

    The backend knows a raster by its path and bytes (its feature cache and search index are keyed on them): a
    VRT written to a new folder for each run would be a new raster each time, and a re-run with other classes
    would pay for the image encoder again."""
    key = {"source": source, "srs": srs, "window": list(window) if window else None}
    if nodata is not None:  # only then: the VRTs kept before nodata was part of the key keep their names
        key["nodata"] = [None if value is None else repr(value) for value in nodata]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    name = os.path.basename(source.rstrip("/\\")) or "raster"
    stem = safe_file_stem(name, fallback="raster")[:40]  # a.tif, g.gpkg_two: what the backend's messages name
    return os.path.join(vrt_cache_dir(), f"{stem}-{digest}.vrt")


def is_kept_vrt(path: str) -> bool:
    """A VRT the plugin keeps of a layer (a name `vrt_path` gives, in the cache folder), there or pruned since."""
    folder = os.path.normcase(os.path.realpath(vrt_cache_dir()))
    return (KEPT_VRT_NAME.fullmatch(os.path.basename(path)) is not None
            and os.path.normcase(os.path.realpath(os.path.dirname(path))) == folder)


class KeptVrt(NamedTuple):
    """What a kept VRT describes (`write_vrt`'s arguments, read back from it): the GDAL dataset, the CRS it gives
    the pixels as WKT (the dataset's own or one set in QGIS; None for none) and the window of the dataset's
    pixels it holds (all of them for a layer's VRT, a search hit's for the VRT of a hit)."""

    source: str
    srs: str | None
    window: PixelWindow


def read_kept_vrt(path: str) -> KeptVrt | None:
    """The dataset, CRS and window of a VRT kept in the cache folder, read from the VRT; None for another file,
    and for a kept VRT that is gone (pruned) or cannot be read. With a layer of that dataset, the VRT's CRS and
    window name the VRT (`vrt_path`)."""
    if not is_kept_vrt(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
        source = root.find("VRTRasterBand/*/SourceFilename")
        rectangle = root.find("VRTRasterBand/*/SrcRect")
        if source is None or not source.text or rectangle is None:
            return None
        x, y, width, height = (round(float(rectangle.get(name, ""))) for name in ("xOff", "yOff", "xSize", "ySize"))
    except (OSError, ElementTree.ParseError, ValueError):
        return None
    name = source.text
    if source.get("relativeToVRT") == "1":
        name = os.path.join(os.path.dirname(path), name)
    srs = root.find("SRS")
    return KeptVrt(name, srs.text if srs is not None and srs.text else None, (x, y, width, height))


def write_vrt(source: str, srs: str | None, path: str, layer_name: str, window: PixelWindow | None = None,
              nodata: tuple[BandNodata, ...] | None = None) -> str:
    """A VRT of the GDAL dataset `source` at `path`, with the CRS `srs` assigned when given, of the pixels in
    `window` when given (else of all of them), with each band's nodata `nodata` when given (a value, or None
    for none) in place of the dataset's own.

    A VRT refers to the pixels, so the layer's own grid, bands, colour interpretation, alpha and mask bands
    reach the backend unchanged and nothing is resampled, however large the layer. A VRT already at `path`
    with the same content is left as it is (its bytes, mtime and inode: the backend's caches still know it);
    one that differs (the source changed) is replaced in one step, never seen half written.
    """
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, draft = tempfile.mkstemp(prefix=".draft-", suffix=".vrt", dir=folder)
        os.close(handle)
    except OSError as error:
        raise LocalCopyError(f"{layer_name} cannot be handed to the backend: the folder {folder} cannot be "
                             f"written ({error.strerror}).") from None
    try:
        options = gdal.TranslateOptions(format="VRT", outputSRS=srs, srcWin=list(window) if window else None)
        try:
            dataset = gdal.Translate(draft, source, options=options)
        except (RuntimeError, ValueError):  # a source GDAL cannot open: "Received a NULL pointer", or GDAL's own
            dataset = None                  # error where gdal.UseExceptions() is on
        if dataset is None:
            raise LocalCopyError(missing_file_text(source, layer_name) or (
                f"{layer_name} cannot be handed to the backend: GDAL cannot describe {source} "
                f"({gdal.GetLastErrorMsg() or 'no reason given'}). Save the layer as a GeoTIFF and use that."))
        for number, value in enumerate(nodata or (), start=1):
            if number <= dataset.RasterCount:
                band = dataset.GetRasterBand(number)
                if value is None:
                    band.DeleteNoDataValue()
                else:
                    band.SetNoDataValue(value)
        dataset = None  # closing the dataset writes the VRT
        if same_bytes(draft, path):
            mark_used(path)
        else:
            try:
                os.replace(draft, path)
            except OSError as error:  # Windows: another job still reads the old one
                raise LocalCopyError(f"{layer_name} cannot be handed to the backend: {path} cannot be replaced "
                                     f"({error.strerror}); try again when the other FarSLIP jobs are done.") from None
    finally:
        if os.path.exists(draft):
            os.remove(draft)
    if os.path.normcase(os.path.realpath(folder)) == os.path.normcase(os.path.realpath(vrt_cache_dir())):
        prune_vrt_cache(folder, keep=path)  # only the plugin's own folder, never one a caller named
    return path


def same_bytes(first: str, second: str) -> bool:
    try:
        with open(first, "rb") as one, open(second, "rb") as other:
            return one.read() == other.read()
    except OSError:
        return False


def mark_used(path: str) -> None:
    """Record a use of a kept VRT in its access time (its mtime, which the backend reads, stays)."""
    try:
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
    except OSError:
        pass


def prune_vrt_cache(folder: str, keep: str = "", now: float | None = None) -> list[str]:
    """Remove the kept VRTs of `folder` that were not used for VRT_CACHE_MAX_AGE_S, and the least recently used
    beyond VRT_CACHE_MAX_FILES (never `keep`), and drafts older than a day; the paths removed. Only names the
    plugin gives (KEPT_VRT_NAME, write_vrt's drafts) are touched: any other file there stays."""
    now = time.time() if now is None else now
    try:
        names = [name for name in os.listdir(folder) if KEPT_VRT_NAME.fullmatch(name)
                 or (name.startswith(".draft-") and name.endswith(".vrt"))]
    except OSError:
        return []
    kept: list[tuple[float, str]] = []
    removed: list[str] = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        used = max(st.st_atime, st.st_mtime)
        if name.startswith("."):
            if now - st.st_mtime > DRAFT_MAX_AGE_S:
                removed.append(path)
        elif os.path.normcase(path) != os.path.normcase(keep):
            kept.append((used, path))
    kept.sort(reverse=True)
    for index, (used, path) in enumerate(kept):
        if index >= VRT_CACHE_MAX_FILES - 1 or now - used > VRT_CACHE_MAX_AGE_S:
            removed.append(path)
    for path in removed:
        try:
            os.remove(path)
        except OSError:
            pass
    return removed


def vrt_step(layer: QgsRasterLayer, window: PixelWindow | None = None) -> Callable[[Any, dict], None]:
    """A step for a job's worker thread: write the layer's VRT (with the layer's CRS where QGIS overrides the
    file's, its nodata where QGIS shows another, of `window`'s pixels when given) and name it as the request's
    raster. Everything it needs is taken from the layer now; a layer it cannot describe fails the job there."""
    try:
        arguments = vrt_arguments(layer, window)
    except LocalCopyError as error:
        refusal = error

        def refuse(task, request):
            raise refusal

        return refuse

    def write_layer_vrt(task, request):
        request["raster"] = write_vrt(*arguments)

    return write_layer_vrt


def vrt_arguments(layer: QgsRasterLayer, window: PixelWindow | None = None
                  ) -> tuple[str, str | None, str, str, PixelWindow | None, tuple[BandNodata, ...] | None]:
    """write_vrt's arguments for a layer of the gdal provider: its dataset, the layer's CRS where QGIS overrides
    the file's, the VRT's kept path (`vrt_path`), the layer's name, the window and the nodata where QGIS
    overrides the file's (LocalCopyError where it cannot: `nodata_overridden`)."""
    source = gdal_dataset_name(layer)
    assert source is not None, "a VRT describes a layer of the gdal provider"
    srs = crs_text(layer.crs()) if crs_overridden(layer) else None
    nodata = nodata_overridden(layer)
    return source, srs, vrt_path(source, srs, window, nodata), layer.name(), window, nodata


def hit_window(path: str, footprint: list) -> PixelWindow | None:
    """The raster's own pixels under a search hit on a rotated grid: the window whose footprint (its corners in
    the raster's CRS, as the backend reports it) is the hit, clipped to the raster. None on a grid without
    rotation terms, where the hit's envelope is that window, and for a footprint that misses the raster.

    On a rotated grid any box in the raster's CRS that holds the hit (its envelope) holds far more of the
    raster around it, and the backend segments all of that box. `path` is what GDAL opens (a file, a /vsizip/
    member, GPKG:a.gpkg:table): a layer's VRT has that dataset's pixel grid, so a hit found through it too."""
    dataset = gdal.Open(path)
    if dataset is None or not footprint:
        return None
    x0, a, b, y0, d, e = dataset.GetGeoTransform()
    determinant = a * e - b * d
    if not (b or d) or not determinant:
        return None
    cols, rows = [], []
    for x, y in footprint:
        dx, dy = float(x) - x0, float(y) - y0
        cols.append((e * dx - b * dy) / determinant)
        rows.append((a * dy - d * dx) / determinant)
    col0, row0 = max(0, math.floor(min(cols) + 1e-6)), max(0, math.floor(min(rows) + 1e-6))
    col1 = min(dataset.RasterXSize, math.ceil(max(cols) - 1e-6))
    row1 = min(dataset.RasterYSize, math.ceil(max(rows) - 1e-6))
    if col1 <= col0 or row1 <= row0:
        return None
    return col0, row0, col1 - col0, row1 - row0


def displayed_bands(layer: QgsRasterLayer) -> list[int] | None:
    """The bands the layer shows, as the backend's `bands`, when the user chose them in the layer's
    symbology: red, green, blue of a multiband colour renderer (a Sentinel-2 stack shown as 4, 3, 2),
    or the one band of a grey or paletted renderer. The model then sees the colours the analyst sees.

    None for QGIS's own first choice (bands 1, 2, 3 of a colour image, band 1 of a grey one), for a
    colour channel left unset and for other renderers: the backend then picks the bands by their colour
    interpretation, which QGIS does not (it shows a file stored blue, green, red in bands 1, 2, 3 with
    red and blue swapped). One band of a colour image (three bands or more) shown in grey is a choice.
    """
    renderer = layer.renderer()
    if isinstance(renderer, QgsMultiBandColorRenderer):
        bands = [renderer.redBand(), renderer.greenBand(), renderer.blueBand()]
        return None if min(bands) < 1 or bands == [1, 2, 3] else bands
    if isinstance(renderer, QgsSingleBandGrayRenderer):
        band = renderer.grayBand()
    elif isinstance(renderer, QgsPalettedRasterRenderer):
        band = renderer.band()
    else:
        return None
    return [band] if band > 1 or layer.bandCount() >= 3 else None


# QGIS 3.38 moved the raster capabilities to Qgis.RasterInterfaceCapability (the only place on QGIS 4).
_SIZE_CAPABILITY = (Qgis.RasterInterfaceCapability.Size if hasattr(Qgis, "RasterInterfaceCapability")
                    else QgsRasterDataProvider.Capability.Size)


def has_pixel_size(layer: QgsRasterLayer) -> bool:
    """Whether the layer has pixels of its own (a WMS/XYZ layer is drawn at any resolution asked for)."""
    provider = layer.dataProvider()
    return bool(provider.capabilities() & _SIZE_CAPABILITY) and provider.xSize() > 0


def export_size(layer: QgsRasterLayer, extent: QgsRectangle, canvas_extent: QgsRectangle | None,
                canvas_size: tuple[int, int]) -> tuple[int, int]:
    """Pixels of the local copy: the layer's own resolution, or the canvas's for WMS/XYZ layers.

    `extent` is in the layer's CRS; `canvas_extent` is the canvas's visible extent in the layer's CRS (only
    read for a layer without a pixel size of its own). A WMS/XYZ copy has square pixels, the finer of the
    canvas's two resolutions in the layer's CRS: a map in another CRS (EPSG:4326 at 47 N shows an EPSG:3857
    layer 1.5 times taller than wide per pixel) would otherwise hand the model a stretched image.
    """
    if has_pixel_size(layer):
        width = extent.width() / layer.rasterUnitsPerPixelX()
        height = extent.height() / layer.rasterUnitsPerPixelY()
    else:
        assert canvas_extent is not None, "a WMS/XYZ layer is fetched at the canvas's resolution"
        pixel = max(min(canvas_extent.width() / max(canvas_size[0], 1),
                        canvas_extent.height() / max(canvas_size[1], 1)), 1e-12)
        width, height = extent.width() / pixel, extent.height() / pixel
    scale = max(width, height) / MAX_EXPORT_SIDE_PX
    if scale > 1:
        width, height = width / scale, height / scale
    return max(1, round(width)), max(1, round(height))


def write_geotiff(provider: QgsRasterDataProvider, extent: QgsRectangle, size: tuple[int, int],
                  crs: QgsCoordinateReferenceSystem, path: str, feedback=None, layer_name: str = "") -> str:
    """Write `extent` (in `crs`, the provider's CRS) of a cloned WMS/XYZ provider to a GeoTIFF.

    Safe to call from a worker thread as long as `provider` is a clone made for it. A copy without one
    pixel of imagery (no tiles there, a server that answered nothing) is refused in the user's words: the
    backend would otherwise name a temporary file the user never saw.
    """
    pipe = QgsRasterPipe()
    if not pipe.set(provider):
        raise LocalCopyError("The layer's data cannot be read for export.")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    error = writer.writeRaster(pipe, size[0], size[1], extent, crs, QgsProject.instance().transformContext(),
                               feedback)
    if error != QgsRasterFileWriter.WriterError.NoError or not os.path.isfile(path):
        code = int(getattr(error, "value", error))  # a Python enum on Qt6 (QGIS 4), an int on QGIS 3
        raise LocalCopyError(f"The layer could not be written to {path} for the backend (error {code}).")
    if not has_imagery(path):
        raise LocalCopyError(f"The layer {layer_name} returned no imagery for this extent (no tiles, or only "
                             "empty ones); pan to where the layer shows imagery, or check its source.")
    return path


def has_imagery(path: str) -> bool:
    """Whether any pixel of the raster at `path` is valid (not nodata, not transparent, not masked)."""
    dataset = gdal.Open(path)
    if dataset is None:
        return False
    minimum_maximum = dataset.GetRasterBand(1).GetMaskBand().ComputeRasterMinMax(False)
    return minimum_maximum is not None and minimum_maximum[1] > 0
