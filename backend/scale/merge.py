"""The outputs of a scaled run: the rasters' layers as one layer, and VRTs over their class and probability rasters.

Each finished raster already has its layer (finish.py); merging concatenates them in input order,
adds the `raster` field (the file each polygon came from), numbers `object_id` through the whole
layer and, for a raster in another CRS than the output's, reprojects its polygons (reproject.py: edges
first split at the raster's pixel size; over the antimeridian and the poles into lon/lat).
Cost: one read and one write of every feature; nothing is unioned here.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyogrio.errors
import pyogrio.raw
import pyproj
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.enums import ColorInterp

from backend.engine.colours import category_names, category_names_xml
from backend.engine.errors import InputError
from backend.engine.export import write_layer, driver_for

from .reproject import reprojected

PARQUET = ".parquet"


def check_merged_output(path: Path) -> None:
    if Path(path).suffix.lower() == PARQUET:
        return
    driver_for(path)


def merge_layers(parts: list[tuple[Path, str, CRS, float]], out: Path, out_crs: CRS, layer: str,
                 keep_from: Path | None = None) -> int:
    """Write the layers `parts` (gpkg, raster name, its CRS, its pixel size) as one layer at `out`."""
    geometries, columns, names = [], {}, None
    for path, raster, crs, pixel_size in parts:
        try:
            meta, _, wkb, values = pyogrio.raw.read(path)
        except (OSError, pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError,
                pyogrio.errors.FeatureError, pyogrio.errors.GeometryError) as error:
            raise InputError(f"{path}, a finished raster's polygons kept in the partial folder of this run, cannot "
                             f"be read ({error}); add --restart to compute the run again.") from None
        names = list(meta["fields"])
        shapes = reprojected(shapely.from_wkb(wkb), crs, out_crs, pixel_size, raster)
        geometries.append(np.asarray(shapes, dtype=object))
        for name, column in zip(names, values):
            columns.setdefault(name, []).append(column)
        columns.setdefault("raster", []).append(np.array([raster] * len(shapes), dtype=object))
    joined = np.concatenate(geometries) if geometries else np.array([], dtype=object)
    fields = {name: np.concatenate(parts_of) for name, parts_of in columns.items()}
    if "object_id" in fields:
        fields["object_id"] = np.arange(1, len(joined) + 1, dtype=np.int64)
    multi = bool(len(joined)) and bool((shapely.get_type_id(joined) == 6).any())
    if multi:
        joined = np.array([shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g for g in joined])
    if out.suffix.lower() == PARQUET:
        write_geoparquet(out, joined, fields, out_crs)
    else:
        write_layer(out, joined, fields, "MultiPolygon" if multi else "Polygon", out_crs, layer=layer,
                    keep_from=keep_from)
    return len(joined)


def write_geoparquet(path: Path, geometries: np.ndarray, fields: dict[str, np.ndarray], crs: CRS) -> None:
    """A GeoParquet 1.0 file: WKB geometry column with the 'geo' metadata, one column per field."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Writing GeoParquet needs pyarrow: pip install 'farslip-qgis[ray]'.") from None
    table = pa.table({**{name: pa.array(list(values) if values.dtype == object else values)
                         for name, values in fields.items()},
                      "geometry": pa.array(shapely.to_wkb(geometries) if len(geometries) else [], pa.binary())})
    types = sorted({g.geom_type for g in geometries})
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": types,
                                    "crs": pyproj.CRS.from_wkt(crs.to_wkt()).to_json_dict(),
                                    "bbox": list(shapely.total_bounds(geometries)) if len(geometries) else []}}}
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)


def write_raster_vrt(path: Path, rasters: list[Path], crs: CRS, read_from: list[Path] | None = None) -> None:
    """A VRT mosaic of same-kind rasters in one CRS, on grids turned one way and not rotated (class or probability
    rasters: every band, its name, nodata and colours), at the finest pixel size among them. `read_from`: where
    the rasters are now, when not yet at the names the VRT gives them (they are renamed into place after)."""
    read_from = read_from or rasters
    with rasterio.open(read_from[0]) as first:
        colormap = first.colormap(1) if first.colorinterp[0] == ColorInterp.palette else None
        tags = [first.tags(band) for band in range(1, first.count + 1)]
        # A uint8 probability raster's scale to 0..1 (segment.deliver_prob_raster), band by band.
        scaling = ["" if (scale, offset) == (1.0, 0.0) else f"<Offset>{offset!r}</Offset><Scale>{scale!r}</Scale>"
                   for scale, offset in zip(first.scales, first.offsets)]
        descriptions, nodata = first.descriptions, first.nodata
        kind = {"uint8": "Byte", "float32": "Float32"}[first.dtypes[0]]
    grids = []
    for raster in read_from:
        with rasterio.open(raster) as ds:
            grids.append((ds.transform, ds.width, ds.height))
    # Every grid runs one way (run.check_raster_outputs: no rotation; north-up, or all south-up): the mosaic
    # runs that way too, at the finest pixel size, from the corner of the grids that comes first along it.
    sx, sy = (1.0 if grids[0][0].a > 0 else -1.0), (1.0 if grids[0][0].e > 0 else -1.0)
    xres, yres = min(abs(t.a) for t, _, _ in grids), min(abs(t.e) for t, _, _ in grids)
    left, top = sx * min(sx * t.c for t, _, _ in grids), sy * min(sy * t.f for t, _, _ in grids)
    width = round(max(sx * (t.c + t.a * w - left) for t, w, _ in grids) / xres)
    height = round(max(sy * (t.f + t.e * h - top) for t, _, h in grids) / yres)
    nodata_text = "" if nodata is None else ("nan" if nodata != nodata else f"{nodata:g}")
    bands = []
    for band, description in enumerate(descriptions, start=1):
        sources = []
        for raster, (t, w, h) in zip(rasters, grids):
            relative = html.escape(str(raster.relative_to(path.parent)))
            x0, y0 = sx * (t.c - left) / xres, sy * (t.f - top) / yres
            dw, dh = abs(t.a) * w / xres, abs(t.e) * h / yres
            sources.append(
                f'<SimpleSource><SourceFilename relativeToVRT="1">{relative}</SourceFilename>'
                f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                f'<DstRect xOff="{x0:.10g}" yOff="{y0:.10g}" xSize="{dw:.10g}" ySize="{dh:.10g}"/>'
                + (f"<NODATA>{nodata_text}</NODATA>" if nodata_text else "") + "</SimpleSource>")
        colours = ""
        if colormap:
            entries = "".join(f'<Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>'
                              for _, (r, g, b, a) in sorted(colormap.items()))
            colours = f"<ColorInterp>Palette</ColorInterp><ColorTable>{entries}</ColorTable>"
        categories = category_names(tags[band - 1])
        if categories is not None:  # a class raster: its classes' names, as write_category_names gives a GeoTIFF
            colours += category_names_xml(categories)
        metadata = "".join(f'<MDI key="{html.escape(k)}">{html.escape(v)}</MDI>' for k, v in tags[band - 1].items())
        bands.append(f'<VRTRasterBand dataType="{kind}" band="{band}">'
                     + (f"<NoDataValue>{nodata_text}</NoDataValue>" if nodata_text else "")
                     + colours + scaling[band - 1] + (f"<Metadata>{metadata}</Metadata>" if metadata else "")
                     + (f"<Description>{html.escape(description)}</Description>" if description else "")
                     + "".join(sources) + "</VRTRasterBand>")
    text = (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
            f'<SRS>{html.escape(crs.to_wkt())}</SRS>'
            f'<GeoTransform>{left!r}, {sx * xres!r}, 0.0, {top!r}, 0.0, {sy * yres!r}</GeoTransform>'
            f'{"".join(bands)}</VRTDataset>\n')
    path.write_text(text, encoding="utf-8")
