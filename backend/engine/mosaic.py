"""Several rasters on one pixel grid as one raster: a VRT mosaic that training reads as it reads any raster.

An analyst's labels often span the tiles of one survey (a NAIP quarter-quad per file). The tiles share a CRS,
a pixel size and a grid; a VRT places each tile's pixels where they lie, nothing is resampled or copied, and
the gaps between tiles (and each tile's own nodata, alpha or mask) are masked through the VRT's mask band.

Where tiles overlap, each pixel comes from the last tile (in the order given) that holds data there.

The VRT is written once per list of rasters into the state folder (`$FARSLIP_HOME/mosaics/`), under a name
made of the rasters' paths: the same list gives the same file, which a fine-tuned model records as its raster
(the VRT's sha256: tiles rewritten in place under the same paths are not told apart), so an evaluation of the
model finds its own raster again.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import rasterio
from rasterio.errors import RasterioError

from .atomic import write_text_atomically
from .errors import InputError
from .files import absolute_raster_name
from .paths import state_dir

# Tiles whose grids are offset by less than this fraction of a pixel are one grid (floating-point rounding).
GRID_TOLERANCE_PX = 1e-3
MAX_RASTERS = 1000


def mosaics_dir() -> Path:
    return state_dir() / "mosaics"


def _describe(path: str) -> dict:
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise InputError(f"The raster {path} has no coordinate reference system; a mosaic places each "
                                 "raster by its CRS and georeferencing.")
            transform = ds.transform
            if transform.b or transform.d or transform.e > 0:
                raise InputError(f"The raster {path} is not north up (a rotated grid, or rows from south to "
                                 "north); a mosaic of several rasters takes north-up rasters only (warp it with "
                                 "gdalwarp first, or train on it alone).")
            return {"path": path, "crs": ds.crs, "transform": transform, "width": ds.width, "height": ds.height,
                    "count": ds.count, "dtypes": list(ds.dtypes), "colorinterp": [c.name for c in ds.colorinterp]}
    except RasterioError as error:
        raise InputError(f"The raster {path} cannot be read: {error}") from None


def _grid_text(first: dict) -> str:
    t = first["transform"]
    return f"{abs(t.a):g} x {abs(t.e):g} pixels"


def mosaic_of(rasters: list[str]) -> str:
    """One raster for `rasters`: the raster itself when there is one, else the kept VRT mosaic of them (same
    CRS, band count and data type, pixel size and pixel grid; else InputError saying which differs and how to
    make them agree)."""
    if not rasters:
        raise InputError("Give at least one raster.")
    if len(rasters) == 1:
        return rasters[0]
    if len(rasters) > MAX_RASTERS:
        raise InputError(f"{len(rasters)} rasters were given; a mosaic takes at most {MAX_RASTERS}.")
    # Each file absolute and resolved (also inside /vsizip/a.zip/x.tif, GPKG:a.gpkg:t): the VRT reads the same
    # files from any folder, and one file named twice (through a link, say) is found.
    names = [absolute_raster_name(name) for name in rasters]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InputError(f"The raster {twice} is given twice; give each raster once.")
    tiles = [_describe(name) for name in names]
    first = tiles[0]
    t0 = first["transform"]
    for tile in tiles[1:]:
        where = f"{tile['path']} and {first['path']}"
        if tile["crs"] != first["crs"]:
            raise InputError(f"The rasters {where} are in different CRSs ({tile['crs'].to_string()}, "
                             f"{first['crs'].to_string()}); reproject them to one CRS (gdalwarp -t_srs) first.")
        if tile["count"] != first["count"] or tile["dtypes"] != first["dtypes"]:
            raise InputError(f"The rasters {where} differ in bands ({tile['count']} {tile['dtypes'][0]}, "
                             f"{first['count']} {first['dtypes'][0]}); a mosaic needs the same bands in each.")
        alpha = [i for i, role in enumerate(tile["colorinterp"]) if role == "alpha"]
        if alpha != [i for i, role in enumerate(first["colorinterp"]) if role == "alpha"]:
            raise InputError(f"The rasters {where} differ in their alpha band (a band is alpha in one and data in "
                             "the other); a mosaic needs the same band roles in each.")
        t = tile["transform"]
        if not (math.isclose(t.a, t0.a, rel_tol=1e-6) and math.isclose(t.e, t0.e, rel_tol=1e-6)):
            raise InputError(f"The rasters {where} have different pixel sizes ({_grid_text(tile)}, "
                             f"{_grid_text(first)}); resample them to one (gdalwarp -tr -tap) first.")
        for offset in ((t.c - t0.c) / t0.a, (t.f - t0.f) / t0.e):
            if abs(offset - round(offset)) > GRID_TOLERANCE_PX:
                raise InputError(f"The rasters {where} are not on one pixel grid (offset by "
                                 f"{abs(offset - round(offset)):.3f} of a pixel); align them (gdalwarp -tr -tap) "
                                 "first.")
    columns = [round((tile["transform"].c - t0.c) / t0.a) for tile in tiles]
    rows = [round((tile["transform"].f - t0.f) / t0.e) for tile in tiles]
    left, top = min(columns), min(rows)
    width = max(c + tile["width"] for c, tile in zip(columns, tiles)) - left
    height = max(r + tile["height"] for r, tile in zip(rows, tiles)) - top
    origin_x, origin_y = t0.c + left * t0.a, t0.f + top * t0.e
    placed = [(tile, c - left, r - top) for tile, c, r in zip(tiles, columns, rows)]
    text = _vrt_text(first, placed, width, height, (origin_x, t0.a, 0.0, origin_y, 0.0, t0.e))
    key = hashlib.sha256(json.dumps(names).encode("utf-8")).hexdigest()[:20]
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in Path(names[0]).stem)[:40] or "mosaic"
    return _kept(text, mosaics_dir() / f"{stem}-and-{len(names) - 1}-more-{key}.vrt")


def _source(tile: dict, band: str, column: int, row: int) -> str:
    """A tile's band placed in the mosaic. Where tiles overlap, a later tile's masked pixels (its nodata, alpha,
    mask) leave the earlier tile's pixels as they are: a data band composites through the tile's mask
    (UseMaskBand, GDAL 3.3+), the mask band skips its zeros (NODATA 0)."""
    w, h = tile["width"], tile["height"]
    through = "<NODATA>0</NODATA>" if band.startswith("mask") else "<UseMaskBand>true</UseMaskBand>"
    # A ComplexSource: GDAL 3.10 reads a SimpleSource of a mask band ("mask,1") wrongly in a whole-raster read.
    return (f"<ComplexSource><SourceFilename relativeToVRT=\"0\">{escape(tile['path'])}</SourceFilename>"
            f"<SourceBand>{band}</SourceBand>{through}"
            f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>"
            f"<DstRect xOff=\"{column}\" yOff=\"{row}\" xSize=\"{w}\" ySize=\"{h}\"/></ComplexSource>")


GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
              "int32": "Int32", "float32": "Float32", "float64": "Float64", "uint64": "UInt64", "int64": "Int64"}


def _vrt_text(first: dict, placed: list[tuple[dict, int, int]], width: int, height: int,
              geotransform: tuple[float, ...]) -> str:
    lines = [f"<VRTDataset rasterXSize=\"{width}\" rasterYSize=\"{height}\">",
             # No axis mapping given: GDAL then takes x, y as east, north (as in the tiles' geotransform) for
             # any CRS, also those whose first axis is latitude or northing (EPSG:4326, EPSG:3035).
             f"  <SRS>{escape(first['crs'].to_wkt())}</SRS>",
             f"  <GeoTransform>{', '.join(repr(float(v)) for v in geotransform)}</GeoTransform>"]
    for index in range(first["count"]):
        kind = GDAL_TYPES.get(first["dtypes"][index])
        if kind is None:
            raise InputError(f"The raster {first['path']} holds {first['dtypes'][index]} pixels, which a mosaic "
                             "does not take; convert it (gdal_translate -ot) first.")
        interp = first["colorinterp"][index]
        lines.append(f"  <VRTRasterBand dataType={quoteattr(kind)} band=\"{index + 1}\">")
        lines.append(f"    <ColorInterp>{escape(interp.capitalize() if interp != 'undefined' else 'Undefined')}"
                     "</ColorInterp>")
        lines.extend(f"    {_source(tile, str(index + 1), column, row)}" for tile, column, row in placed)
        lines.append("  </VRTRasterBand>")
    # Gaps between the rasters and each raster's own nodata, alpha or mask: one mask for every band.
    lines.append("  <MaskBand>")
    lines.append("    <VRTRasterBand dataType=\"Byte\">")
    lines.extend(f"      {_source(tile, 'mask,1', column, row)}" for tile, column, row in placed)
    lines.append("    </VRTRasterBand>")
    lines.append("  </MaskBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _kept(text: str, path: Path) -> str:
    """`text` at `path`: left as it is where it is there already (its bytes and identity unchanged), else
    written whole."""
    try:
        if path.read_text("utf-8") == text:
            return str(path)
    except (OSError, UnicodeDecodeError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, text)
    except OSError as error:
        raise InputError(f"The mosaic of the rasters cannot be written to {path.parent} ({error.strerror}).") from None
    return str(path)
