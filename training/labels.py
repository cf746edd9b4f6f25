"""Labelled polygons -> a class raster on the raster's processing grid.

The analyst's polygon layer may be in any CRS; polygons are reprojected to
the raster's CRS and burnt into the same pixel grid the engine segments
(`backend.engine.raster.RasterSource`), so that every metric compares like with like.
Pixel values: class id 0..C-1, or -1 for unlabelled / nodata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from pyproj.exceptions import CRSError
from rasterio.features import rasterize

from backend.engine.errors import InputError
from backend.engine.files import check_vector_source
from backend.engine.raster import PixelWindow, RasterSource
from backend.engine.text import parse_class_lines

UNLABELLED = -1
MIN_LABELLED_PIXELS = 256


@dataclass
class LabelPolygons:
    """Polygons in the raster's CRS with the class name of each."""

    geometries: np.ndarray  # shapely polygons / multipolygons
    class_values: list[str]
    path: Path
    source_crs: str


@dataclass
class LabelGrid:
    """Rasterised labels for one window of the raster's processing grid."""

    labels: np.ndarray  # (h, w) int16, class id or UNLABELLED
    window: PixelWindow  # where `labels` sits on the processing grid
    class_lines: list[str]  # class id -> class line (the label value; background last)
    background: str | None
    polygons: LabelPolygons
    class_of_polygon: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def class_names(self) -> list[str]:
        return [spec.name for spec in parse_class_lines(self.class_lines)]

    def pixel_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0].ravel(), minlength=len(self.class_lines))
        return {name: int(n) for name, n in zip(self.class_lines, counts)}


def _value_text(value) -> str:
    """A field value as a class name: 3.0 -> "3", None/NaN/"" -> ""."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def _read_layer(path: Path, columns: list[str] | None, what: str):
    check_vector_source(path, what)
    try:
        return pyogrio.raw.read(path, columns=columns)
    except Exception as exc:  # pyogrio raises DataSourceError / DataLayerError / FieldError
        raise InputError(f"The {what} file {path} cannot be read as a vector layer ({exc}). Give a "
                         "GeoPackage, Shapefile or GeoJSON with polygons.") from exc


def _layer_crs(meta: dict, path: Path, what: str) -> ProjCRS:
    text = meta.get("crs")
    if not text:
        raise InputError(f"The {what} file {path} has no coordinate reference system, so it cannot be "
                         "placed on the raster. Set its CRS in QGIS (Layer > Set CRS) and save it again.")
    try:
        return ProjCRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"The CRS of the {what} file {path} ({text}) is unknown: {exc}.") from exc


def _to_raster_crs(geometries: np.ndarray, source: ProjCRS, target, path: Path) -> np.ndarray:
    target_crs = ProjCRS.from_user_input(target.to_wkt())
    if source == target_crs:
        return geometries
    transformer = Transformer.from_crs(source, target_crs, always_xy=True)
    out = shapely.transform(geometries, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    coords = shapely.get_coordinates(out)
    if coords.size and not np.isfinite(coords).all():
        raise InputError(f"The polygons of {path} lie outside the area where {source.name} can be "
                         f"transformed to the raster's CRS {target_crs.name}.")
    return out


def read_label_polygons(path: str | Path, class_field: str, raster_crs,
                        class_names: dict[str, str] | None = None) -> LabelPolygons:
    """Read polygons and their class field, reprojected to `raster_crs` (a rasterio CRS)."""
    path = check_vector_source(path, "labels")
    try:
        available = [str(name) for name in pyogrio.read_info(path)["fields"]]
    except Exception as exc:  # pyogrio raises DataSourceError / DataLayerError
        raise InputError(f"The labels file {path} cannot be read as a vector layer ({exc}). Give a "
                         "GeoPackage, Shapefile or GeoJSON with polygons.") from exc
    if class_field not in available:
        hint = ", ".join(available) if available else "(none)"
        raise InputError(f"The labels file {path.name} has no field {class_field!r}; its fields are: "
                         f"{hint}. Pass the field that holds the class names with --class-field.")
    meta, _, wkb, fields = _read_layer(path, [class_field], "labels")
    crs = _layer_crs(meta, path, "labels")
    if wkb is None or len(wkb) == 0:
        raise InputError(f"The labels file {path.name} holds no features.")
    geometries = shapely.from_wkb(wkb)
    values = [_value_text(v) for v in fields[0]]
    keep = np.array([g is not None and not g.is_empty and v != "" for g, v in zip(geometries, values)])
    geometries = geometries[keep]
    values = [v for v, k in zip(values, keep) if k]
    kinds = shapely.get_type_id(geometries)
    polygonal = np.isin(kinds, [3, 6])
    if len(geometries) and not polygonal.any():
        raise InputError(f"The labels file {path.name} holds {geometries[0].geom_type} features, not "
                         "polygons; draw the labelled regions as polygons.")
    geometries = shapely.make_valid(geometries[polygonal])
    values = [v for v, k in zip(values, polygonal) if k]
    if class_names:
        values = [class_names.get(v, v) for v in values]
    geometries = _to_raster_crs(geometries, crs, raster_crs, path)
    return LabelPolygons(geometries, values, path, crs.to_string())


def read_aoi(path: str | Path, raster_crs) -> shapely.Geometry:
    """The union of an area-of-interest layer's polygons, in the raster's CRS."""
    path = Path(path)
    meta, _, wkb, _ = _read_layer(path, [], "area-of-interest")
    crs = _layer_crs(meta, path, "area-of-interest")
    geometries = shapely.from_wkb(wkb) if wkb is not None else np.array([])
    geometries = geometries[np.isin(shapely.get_type_id(geometries), [3, 6])] if len(geometries) else geometries
    if len(geometries) == 0:
        raise InputError(f"The area-of-interest file {path.name} holds no polygons.")
    return shapely.union_all(_to_raster_crs(shapely.make_valid(geometries), crs, raster_crs, path))


def _window_of(source: RasterSource, bounds: tuple[float, float, float, float]) -> PixelWindow | None:
    inverse = ~source.transform
    xs, ys = [bounds[0], bounds[2]], [bounds[1], bounds[3]]
    cols, rows = zip(*(inverse @ (x, y) for x in xs for y in ys))
    row0 = max(0, math.floor(min(rows) + 1e-6))
    col0 = max(0, math.floor(min(cols) + 1e-6))
    row1 = min(source.height, math.ceil(max(rows) - 1e-6))
    col1 = min(source.width, math.ceil(max(cols) - 1e-6))
    if row1 <= row0 or col1 <= col0:
        return None
    return PixelWindow(row0, col0, row1 - row0, col1 - col0)


def rasterise(geometries: np.ndarray, class_ids: np.ndarray, window: PixelWindow,
              source: RasterSource) -> np.ndarray:
    """Burn polygons into an int16 grid; smaller polygons win where polygons overlap."""
    shape = (window.height, window.width)
    if len(geometries) == 0:
        return np.full(shape, UNLABELLED, dtype=np.int16)
    order = np.argsort(-shapely.area(geometries), kind="stable")
    return rasterize(((geometries[i], int(class_ids[i])) for i in order), out_shape=shape,
                     transform=source.window_transform(window), fill=UNLABELLED, dtype="int16")


def build_label_grid(source: RasterSource, polygons: LabelPolygons, background: str | None = None,
                     aoi: shapely.Geometry | None = None, class_lines: list[str] | None = None,
                     min_labelled_pixels: int = MIN_LABELLED_PIXELS) -> LabelGrid:
    """Rasterise polygons over their extent (or the AOI) on the raster's processing grid.

    `class_lines` fixes the class order (e.g. a fine-tuned model's); by default the
    sorted label values, then the background class.
    """
    label_file = polygons.path.name
    if len(polygons.geometries) == 0:
        raise InputError(f"The labels file {label_file} holds no labelled polygons (every feature has "
                         "an empty class value or no geometry).")
    values = sorted(set(polygons.class_values))
    if class_lines is None:
        class_lines = values + ([background] if background and background not in values else [])
    names = [spec.name.lower() for spec in parse_class_lines(class_lines)]
    lookup = {line.lower(): i for i, line in enumerate(class_lines)}
    lookup.update({name: i for i, name in enumerate(names)})
    missing = [v for v in values if v.lower() not in lookup]
    if missing:
        raise InputError(f"The label classes {missing} are not among the model's classes {class_lines}.")
    if len(class_lines) < 2:
        raise InputError(f"The labels in {label_file} hold only one class ({values[0]!r}); a segmentation "
                         "needs at least two. Label another class, or pass --background NAME to treat "
                         "unlabelled pixels inside the labels' extent as a class.")
    class_ids = np.array([lookup[v.lower()] for v in polygons.class_values], dtype=np.int64)

    extent = aoi if aoi is not None else shapely.box(*shapely.total_bounds(polygons.geometries))
    window = _window_of(source, extent.bounds)
    footprint = shapely.box(*source.window_bounds(PixelWindow(0, 0, source.height, source.width)))
    if window is None or not shapely.intersects(shapely.union_all(polygons.geometries), footprint):
        lx0, ly0, lx1, ly1 = shapely.total_bounds(polygons.geometries)
        rx0, ry0, rx1, ry1 = footprint.bounds
        raise InputError(f"The labels in {label_file} do not overlap the raster {source.path.name}: the "
                         f"labels cover x {lx0:.6g}..{lx1:.6g}, y {ly0:.6g}..{ly1:.6g} and the raster x "
                         f"{rx0:.6g}..{rx1:.6g}, y {ry0:.6g}..{ry1:.6g} (in the raster's CRS "
                         f"{source.crs.to_string()}; the labels were in {polygons.source_crs}).")

    labels = rasterise(polygons.geometries, class_ids, window, source)
    if background:
        region = rasterise(np.array([extent]), np.array([1]), window, source) == 1
        labels[(labels == UNLABELLED) & region] = lookup[background.lower()]
    _, valid = source.read(window)
    labels[~valid] = UNLABELLED

    labelled = int((labels >= 0).sum())
    if labelled < min_labelled_pixels:
        raise InputError(f"Only {labelled} pixels of the raster are labelled by {label_file}; at least "
                         f"{min_labelled_pixels} are needed. Draw more or larger polygons (or check they "
                         "fall on valid, non-nodata pixels).")
    present = np.unique(labels[labels >= 0])
    if len(present) < 2:
        raise InputError(f"The labels in {label_file} cover only one class ({class_lines[present[0]]!r}) "
                         "on the raster's valid pixels; a segmentation needs at least two. Label another "
                         "class, or pass --background NAME.")
    return LabelGrid(labels, window, list(class_lines), background, polygons, class_ids)
