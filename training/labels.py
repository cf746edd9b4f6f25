"""Labelled polygons -> a class raster on the raster's processing grid.

The analyst's polygon layer may be in any CRS; polygons are reprojected to
the raster's CRS and burnt into the same pixel grid the engine segments
(`backend.engine.raster.RasterSource`), so that every metric compares like with like.
Pixel values: class id 0..C-1, or -1 for unlabelled / nodata.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
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
from backend.engine.files import check_vector_source, vector_readable
from backend.engine.ground import crs_label, degrees_per_unit
from backend.engine.raster import PixelWindow, RasterSource, coordinates, longitude_on, longitude_turn, x_turn
from backend.engine.presets import parse_class_lines, split_class_line

UNLABELLED = -1
MIN_LABELLED_PIXELS = 256


NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")  # an integer- or decimal-coded class value (1, 2, 11.0)


@dataclass
class LabelPolygons:
    """Polygons in the raster's CRS with the class name of each."""

    geometries: np.ndarray  # shapely polygons / multipolygons
    class_values: list[str]
    path: Path
    source_crs: str
    class_field: str = ""
    features: int = 0  # features in the layer
    without_class: int = 0  # of them, left out for a null, empty or blank class value
    not_polygons: int = 0  # of them, left out for being points or lines (beside polygons)
    no_geometry: int = 0  # of them, left out for a NULL or empty geometry
    no_area: int = 0  # of them, polygons left out for having no area once made valid
    outside: int = 0  # of them, polygons wholly outside the raster (set by build_label_grid)
    labelled_pixels: int = 0  # pixels the polygons cover on the raster (set by build_label_grid)
    on_nodata: int = 0  # of them, on the raster's nodata, so left out (set by build_label_grid)
    contested: int = 0  # of them, under polygons of more than one class (set by build_label_grid)
    misread: list[tuple[str, str]] = field(default_factory=list)  # (value as read, as UTF-8 would read it)

    @property
    def warnings(self) -> list[str]:
        """What reading left out that the user should hear about (one sentence each)."""
        said = []
        if self.without_class:
            said.append(f"{self.without_class} of the {self.features} features in {self.path.name} have no value "
                        f"in the class field {self.class_field!r}, so they were left out.")
        if self.not_polygons:
            said.append(f"{self.not_polygons} of the {self.features} features in {self.path.name} are points or "
                        "lines, not polygons, so they were left out (a label is an area).")
        dropped = [(self.no_geometry, "without a geometry"),
                   (self.no_area, "whose polygon has no area (a ring folded onto itself, repaired to nothing)"),
                   (self.outside, "wholly outside the raster")]
        if any(count for count, _ in dropped):
            total = sum(count for count, _ in dropped)
            parts = ", ".join(f"{count} {what}" for count, what in dropped if count)
            said.append(f"{total} of the {self.features} features in {self.path.name} were left out: {parts}.")
        if self.on_nodata:
            said.append(f"{self.on_nodata} of the {self.labelled_pixels} labelled pixels of {self.path.name} lie on "
                        "the raster's nodata, so they were left out.")
        if self.contested:
            said.append(f"{self.contested} labelled pixels of {self.path.name} lie under polygons of more than one "
                        "class; each took the class of the smallest polygon over it (of polygons the same size, "
                        "the later feature's).")
        values = set(self.class_values)
        # Every code, or those left after --class-name renamed some of them.
        if self.misread:
            read, meant = self.misread[0]
            said.append(f"The class names in {self.path.name} look like UTF-8 text read as ISO-8859-1 ({read!r} would "
                        f"be {meant!r}): the shapefile has no {self.path.with_suffix('.cpg').name} naming its "
                        f"encoding. If they are wrong, write UTF-8 into {self.path.with_suffix('.cpg').name} and "
                        "run again.")
        codes = sorted((v for v in values if NUMBER.fullmatch(v)), key=lambda v: (len(v), v))
        if codes:
            shown = ", ".join(codes[:5]) + (", ..." if len(codes) > 5 else "")
            which = "The classes" if len(codes) == len(values) else "Some classes"
            said.append(f"{which} in the field {self.class_field!r} of {self.path.name} are numbers ({shown}), "
                        "which the model reads as class names that mean nothing to it; name them, e.g. "
                        f"--class-name {codes[0]}=water (one per code).")
        return said


@dataclass
class LabelGrid:
    """Rasterised labels for one window of the raster's processing grid."""

    labels: np.ndarray  # (h, w) int16, class id or UNLABELLED
    window: PixelWindow  # where `labels` sits on the processing grid
    class_lines: list[str]  # class id -> class line (the label value; background last)
    background: str | None
    polygons: LabelPolygons
    class_of_polygon: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Classes the labels draw polygons of, none of whose pixels is a valid labelled pixel of the grid.
    absent: list[str] = field(default_factory=list)

    def absent_sentence(self, label_file: str) -> str | None:
        """What `absent` means, in a sentence (None when every labelled class has pixels)."""
        if not self.absent:
            return None
        many = len(self.absent) > 1
        listed = ", ".join(repr(line) for line in self.absent)
        return (f"The polygons of the class{'es' if many else ''} {listed} in {label_file} label no valid pixel of "
                f"the raster: they lie outside it (or outside the --aoi), on nodata, under smaller polygons of other "
                f"classes, or are too thin to hold a pixel's centre")

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


def _unreadable(path: Path, what: str, exc: Exception) -> InputError:
    """One sentence for a vector file GDAL cannot read (its own text, raw SQL or a driver's, is left out)."""
    if isinstance(exc, UnicodeDecodeError):  # the file opens (QGIS shows it); its text is not in the encoding named
        cpg = _cpg_file(path)
        named = f"the encoding its {cpg.name} names ({exc.encoding})" if cpg is not None else exc.encoding
        fix = (f"write the file's real encoding into {cpg.name} (e.g. ISO-8859-1 or CP1252)" if cpg is not None
               else "save it again in UTF-8")
        return InputError(f"The text of the {what} file {path} is not in {named}: it holds the bytes "
                          f"{exc.object[exc.start:exc.end + 8]!r}. Fix it: {fix}, or save the layer again with "
                          "the encoding UTF-8 (QGIS: Export > Save Features As).")
    if path.suffix.lower() == ".gpkg":
        return InputError(f"The {what} file {path} is not a readable GeoPackage (damaged or not a GeoPackage), "
                          "so it cannot be read as a vector layer; give a GeoPackage, Shapefile or GeoJSON with "
                          "polygons.")
    return InputError(f"The {what} file {path} cannot be read as a vector layer (it is damaged, or in a format "
                      "GDAL does not read); give a GeoPackage, Shapefile or GeoJSON with polygons.")


@contextmanager
def _quiet():
    """GDAL's messages (M values dropped, as labels need none; a damaged file's 'bad application_id') are
    Python warnings with a library path: kept off stderr, what matters comes as one sentence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def split_layer(source: str | Path) -> tuple[Path, str | None]:
    """`path|layername=NAME` (QGIS's way of naming a layer of a file) -> (path, NAME); a plain path -> (path, None)."""
    text = str(source)
    if "|" not in text or Path(text).exists():
        return Path(text), None
    path, _, options = text.partition("|")
    layer = None
    for option in options.split("|"):
        key, equals, value = option.partition("=")
        if key.strip().lower() != "layername" or not equals or not value:
            raise InputError(f"{text!r} names a file and then {option!r}; after the file name only "
                             f"|layername=NAME is understood (e.g. {path}|layername=labels).")
        layer = value
    return Path(path), layer


def vector_file(source: str | Path) -> Path:
    """The file of a vector source given as `path` or `path|layername=NAME`."""
    return split_layer(source)[0]


def _is_polygonal(kind: str | None) -> bool:
    """A layer that may hold polygons (a table without geometry holds none)."""
    return kind is not None and ("polygon" in kind.lower() or kind.lower() in ("unknown", "geometry"))


def _choose_layer(path: Path, layer: str | None, what: str, class_field: str | None = None) -> str | None:
    """The layer to read: the one named, the only one, or the only polygon layer (with `class_field`)."""
    try:
        with _quiet(), vector_readable(path) as readable:
            listed = pyogrio.list_layers(readable)
        layers = [(str(name), str(kind) if kind is not None else None) for name, kind in listed]
    except Exception as exc:  # pyogrio raises DataSourceError
        raise _unreadable(path, what, exc) from exc
    names = [name for name, _ in layers]
    listing = ", ".join(f"{name} ({kind or 'no geometry'})" for name, kind in layers)
    if layer is not None:
        if layer not in names:
            raise InputError(f"The {what} file {path.name} has no layer {layer!r}; its layers are: {listing}. "
                             f"Choose one with |layername=NAME after the file name.")
        return _with_geometry(path, layer, dict(layers)[layer], what, named=len(layers) > 1)
    if len(layers) <= 1:
        return _with_geometry(path, names[0], layers[0][1], what, named=False) if names else None
    polygonal = [name for name, kind in layers if _is_polygonal(kind)]
    candidates = polygonal
    if class_field is not None:
        candidates = [name for name in polygonal if class_field in _fields(path, name, what)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates and len(polygonal) == 1:
        return polygonal[0]  # its fields are listed when the class field is missing
    wanted = f"polygon layer with the field {class_field!r}" if class_field is not None else "polygon layer"
    example = (candidates or polygonal or names)[0]
    raise InputError(f"The {what} file {path.name} holds {len(layers)} layers ({listing}) and "
                     f"{'several are a ' if candidates else 'none is a '}{wanted}; choose one by adding "
                     f"|layername=NAME to the path, e.g. \"{path}|layername={example}\".")


def _with_geometry(path: Path, layer: str, kind: str | None, what: str, named: bool) -> str:
    """`layer`, refused when it is a table without geometry (a CSV of class names and x, y columns): it holds no
    polygons, which was said as a missing coordinate reference system, or by the server as a single class."""
    if kind is None:
        which = f"layer {layer!r} of the {what} file {path.name}" if named else f"{what} file {path.name}"
        raise InputError(f"The {which} is a table without geometry, so it holds no polygons; give a polygon layer "
                         "(GeoPackage, Shapefile or GeoJSON).")
    return layer


def _fields(path: Path, layer: str | None, what: str) -> list[str]:
    try:
        with _quiet(), vector_readable(path) as readable:
            return [str(name) for name in pyogrio.read_info(readable, layer=layer)["fields"]]
    except Exception as exc:  # pyogrio raises DataSourceError / DataLayerError
        raise _unreadable(path, what, exc) from exc


def _feature_count(path: Path, layer: str | None) -> int | None:
    """The layer's feature count where the driver knows it cheaply (None where it does not)."""
    try:
        with _quiet(), vector_readable(path) as readable:
            count = pyogrio.read_info(readable, layer=layer)["features"]
    except Exception:  # pyogrio raises DataSourceError / DataLayerError; _fields has read it already
        return None
    return int(count) if count is not None and count >= 0 else None


def _read_layer(path: Path, layer: str | None, columns: list[str] | None, what: str, read_geometry: bool = True):
    check_vector_source(path, what)
    try:
        with _quiet(), vector_readable(path) as readable:
            return pyogrio.raw.read(readable, layer=layer, columns=columns, read_geometry=read_geometry)
    except Exception as exc:  # pyogrio raises DataSourceError / DataLayerError / FieldError
        raise _unreadable(path, what, exc) from exc


def _polygonal_parts(geometries: np.ndarray) -> np.ndarray:
    """Valid polygons: a ring that folds back on itself (a zero-width spike, a sliver) keeps only its
    area, never the collapsed line, which would otherwise be burnt as labelled pixels."""
    valid = shapely.make_valid(geometries, method="structure", keep_collapsed=False)
    kept = []
    for geometry in valid:
        if shapely.get_type_id(geometry) not in (3, 6):
            parts = shapely.get_parts(geometry)
            while len(parts) and (shapely.get_type_id(parts) == 7).any():  # collections inside collections
                parts = shapely.get_parts(parts)
            parts = shapely.get_parts(parts[np.isin(shapely.get_type_id(parts), [3, 6])])
            geometry = shapely.MultiPolygon(list(parts)) if len(parts) else shapely.MultiPolygon()
            if len(parts) > 1 and not geometry.is_valid:  # overlapping polygons of a collection
                geometry = shapely.union_all(parts)
        kept.append(geometry)
    return np.array(kept, dtype=object)


def _holds_polygons(geometries: np.ndarray) -> np.ndarray:
    """Which geometries are or hold polygons: polygons, multipolygons, and geometry collections with a
    polygon among their parts (their points and lines are dropped by `_polygonal_parts`)."""
    kinds = shapely.get_type_id(geometries)
    holds = np.isin(kinds, [3, 6])
    for i in np.flatnonzero(kinds == 7):
        parts = shapely.get_parts(geometries[i])
        while len(parts) and (shapely.get_type_id(parts) == 7).any():  # collections inside collections
            parts = shapely.get_parts(parts)
        holds[i] = bool(np.isin(shapely.get_type_id(parts), [3, 6]).any())
    return holds


def _layer_crs(meta: dict, path: Path, what: str) -> ProjCRS:
    text = meta.get("crs")
    if not text:
        raise InputError(f"The {what} file {path} has no coordinate reference system, so it cannot be "
                         "placed on the raster. Set its CRS in QGIS (Layer > Set CRS) and save it again.")
    try:
        return ProjCRS.from_user_input(text)
    except CRSError as exc:
        raise InputError(f"The CRS of the {what} file {path} ({text}) is unknown: {exc}.") from exc


def _to_raster_crs(geometries: np.ndarray, source: ProjCRS, target, path: Path,
                   raster_bounds: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Geometries in `source` -> in the raster's CRS `target`; in a geographic raster's CRS (or a cylindrical
    projection of the whole world, whose x comes back after a turn: `x_turn`, EPSG:3857) each ring's x runs on
    without a jump of a whole turn (`_unwrapped`: PROJ gives -180..180, and a polygon across the antimeridian
    came out as a sliver around the world), and each polygon is moved by whole turns onto the raster's x
    (`raster_bounds`) where it falls there (labels at -159.85 on a raster over 200..200.4, or at -179.9 on one
    across the antimeridian)."""
    target_crs = ProjCRS.from_user_input(target.to_wkt())
    turn = x_turn(target_crs)
    out = geometries
    if source.is_geographic:
        _check_lonlat(geometries, source, target_crs, path, raster_bounds)
    if source != target_crs:
        transformer = _transformer(source, target_crs, path)
        with np.errstate(all="ignore"):
            out = shapely.transform(geometries, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
            if turn and len(out):
                out = _unwrapped(geometries, out, transformer, source, target_crs.is_geographic, turn)
        coords = shapely.get_coordinates(out)
        if coords.size and not np.isfinite(coords).all():
            raise InputError(f"The polygons of {path} lie outside the area where {_named(source)} can be "
                             f"transformed to the raster's CRS {_named(target_crs)}.")
    if turn and raster_bounds is not None and len(out):
        out = _longitudes_onto(out, raster_bounds, turn)
    return out


def _transformer(source: ProjCRS, target_crs: ProjCRS, path: Path) -> Transformer:
    """PROJ's way from the layer's CRS to the raster's; InputError, a sentence, where it knows none (a local
    (engineering) CRS is tied to no place on the earth: `unplaced`'s words for a --bbox-crs)."""
    try:
        return Transformer.from_crs(source, target_crs, always_xy=True)
    except Exception as exc:  # pyproj raises ProjError / CRSError (and others) for CRSs it cannot join
        start = f"The polygons of {path.name} cannot be placed on the raster: PROJ knows no way from their CRS"
        if source.is_engineering and target_crs.is_engineering and source.name == target_crs.name:
            raise InputError(f"{start} {_named(source)} to the raster's, a local (engineering) CRS of the same name "
                             "defined otherwise (a GeoTIFF keeps less of a local CRS). If they are the same grid, "
                             "set the layer's CRS to the raster's (in QGIS: Layer > Set CRS) and save it "
                             "again.") from exc
        local = ", a local (engineering) CRS that is not tied to the earth"
        raise InputError(
            f"{start} {_named(source)}{local + ',' if source.is_engineering else ''} to the raster's CRS "
            f"{_named(target_crs)}{local if target_crs.is_engineering else ''}. Give polygons drawn in the raster's "
            "own CRS, or in one that PROJ can transform to it.") from exc


def _unwrapped(geometries: np.ndarray, moved: np.ndarray, transformer: Transformer, source: ProjCRS,
               geographic: bool, turn: float) -> np.ndarray:
    """`moved` (`geometries` transformed vertex by vertex into the raster's CRS, whose x comes back after
    `turn`: longitudes, or a cylindrical projection's x) with each ring's x continuous: a step of more than half
    a turn between consecutive points that the layer does not have (in a projected layer, none; in degrees,
    the layer's own step) is a wrap of PROJ's -180..180 and is taken back. Projected polygons with such a step
    are cut into short edges first, so that each edge's step is the short one (an edge across a whole world
    map, -180 to 180, is a turn, not nothing)."""
    scale = turn / longitude_turn(source) if source.is_geographic else 0.0
    source_xy, owner = shapely.get_coordinates(geometries, return_index=True)
    moved_x = shapely.get_coordinates(moved)[:, 0]
    same = owner[1:] == owner[:-1]
    step = np.diff(moved_x) - scale * np.diff(source_xy[:, 0])
    jumps = np.unique(owner[1:][same & (np.abs(step) > turn / 2)])
    out = moved.copy()
    for i in jumps:
        parts = shapely.get_parts(geometries[i])
        if not scale:  # edges of at most 1/256 of the part's width or height (1.4 degrees across the world)
            x0, y0, x1, y1 = shapely.bounds(parts).T
            parts = shapely.segmentize(parts, np.maximum(np.maximum(x1 - x0, y1 - y0) / 256, 1e-9))
        parts = [_unwrapped_polygon(part, transformer, scale, turn, geographic) for part in parts]
        if any(part is None for part in parts):  # around a pole, which a projection cannot reach: as it was
            continue
        out[i] = parts[0] if len(parts) == 1 else shapely.union_all(parts)
    return out


def _unwrapped_polygon(polygon: shapely.Polygon, transformer: Transformer, scale: float, turn: float,
                       geographic: bool) -> shapely.Geometry | None:
    """One polygon of `_unwrapped`: each ring transformed with its steps taken back by whole turns, the holes
    moved by whole turns into their exterior's longitudes. A ring around a pole (its longitudes end a turn
    from where they began) encloses the pole: it is closed along the pole, and the polygon is cut to one turn
    of longitude from the repeats of its rings a turn apart; None in a projection (`geographic` False), which
    does not reach the pole."""
    rings, wound = [], []
    for ring in [polygon.exterior, *polygon.interiors]:
        xy = shapely.get_coordinates(ring)
        x, y = (np.asarray(v, float) for v in transformer.transform(xy[:, 0], xy[:, 1]))
        own = scale * np.diff(xy[:, 0])  # the layer's own steps in degrees (none in a projected layer)
        x = x - turn * np.r_[0.0, np.cumsum(np.rint((np.diff(x) - own) / turn))]
        wound.append(abs(x[-1] - x[0]) > turn / 2)
        if wound[-1] and not geographic:
            return None
        if wound[-1]:
            pole = math.copysign(turn / 4, float(np.mean(y)))
            x, y = np.r_[x, x[-1], x[0], x[0]], np.r_[y, pole, pole, y[0]]
        rings.append(np.column_stack([x, y]))
    west, east = rings[0][:, 0].min(), rings[0][:, 0].max()
    holes = [hole if around else hole - [turn * np.rint((hole[:, 0].mean() - (west + east) / 2) / turn), 0.0]
             for hole, around in zip(rings[1:], wound[1:])]
    if not any(wound):
        return shapely.Polygon(rings[0], holes)

    def area(ring: np.ndarray, around: bool) -> shapely.Geometry:
        shape = shapely.Polygon(ring)
        if not around:
            return shape
        return shapely.union_all([shapely.transform(shape, lambda xy, k=k: xy + np.array([k * turn, 0.0]))
                                  for k in (-1, 0, 1)])

    shape = shapely.difference(area(rings[0], wound[0]), shapely.union_all([area(hole, around) for hole, around
                                                                           in zip(holes, wound[1:])]))
    west = west if wound[0] else (west + east - turn) / 2
    return shapely.clip_by_rect(shape, west, -turn / 4, west + turn, turn / 4)


def _named(crs: ProjCRS) -> str:
    """A CRS's name with its code (WGS 84 (EPSG:4326)); its name alone where it has no code."""
    code = crs_label(crs)
    return crs.name if code.strip("'") == crs.name else f"{crs.name} ({code})"


def _check_lonlat(geometries: np.ndarray, source: ProjCRS, target_crs: ProjCRS, path: Path,
                  raster_bounds: tuple[float, float, float, float] | None) -> None:
    """Refuse coordinates that cannot be longitudes and latitudes in `source`'s unit (400 and 100 grads in
    EPSG:4807), and ones latitude first: off the raster as they are, on it with x and y swapped."""
    coords = shapely.get_coordinates(geometries)
    if not coords.size:
        return
    unit = degrees_per_unit(source)
    plausible = np.abs(coords[:, 0]).max() <= 360 / unit and np.abs(coords[:, 1]).max() <= 90 / unit
    x, y = coords[np.argmax(np.abs(coords).max(axis=1))]
    label = _named(source)
    if raster_bounds is not None and (not plausible or not _on_raster(coords, source, target_crs, raster_bounds)) \
            and _on_raster(coords[:, ::-1], source, target_crs, raster_bounds):
        raise InputError(f"{path.name} says its polygons are in {label} (longitude, then latitude), but their "
                         f"axes look swapped: they hold coordinates such as {x:.2f}, {y:.2f}, latitude first, and "
                         "only with x and y swapped do they lie on the raster. Swap them (in QGIS: Processing "
                         "Toolbox > Swap X and Y coordinates), save the layer and give it again.")
    if plausible:
        return
    units = "degrees" if unit == 1 else "longitudes and latitudes"
    raise InputError(f"{path.name} says its polygons are in {label} (longitude and latitude; a GeoJSON "
                     f"without a 'crs' member always is), but they hold coordinates such as {x:.2f}, "
                     f"{y:.2f}, which are not {units}. Set the layer's real CRS in QGIS (Layer > Set CRS) "
                     "and save it as a GeoPackage, or reproject the file to EPSG:4326.")


def _on_raster(coords: np.ndarray, source: ProjCRS, target_crs: ProjCRS,
               raster_bounds: tuple[float, float, float, float]) -> bool:
    """Whether any of the (longitude, latitude) points, in `source`'s unit, falls on the raster's envelope
    (longitudes moved by whole turns onto a geographic raster's)."""
    unit = degrees_per_unit(source)
    lon, lat = coords[:, 0], coords[:, 1]
    if np.abs(lat).max() > 90 / unit or np.abs(lon).max() > 360 / unit:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs, ys = Transformer.from_crs(source, target_crs, always_xy=True).transform(lon, lat)
    except Exception:  # pyproj raises several types for points it cannot transform
        return False
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    xmin, ymin, xmax, ymax = raster_bounds
    if target_crs.is_geographic:
        turn = longitude_turn(target_crs)
        xs = np.array([longitude_on(x, xmin, xmax, turn) if np.isfinite(x) else x for x in xs])
    inside = np.isfinite(xs) & np.isfinite(ys) & (xs >= xmin) & (xs <= xmax) & (ys >= ymin) & (ys <= ymax)
    return bool(inside.any())


def _longitudes_onto(geometries: np.ndarray, raster_bounds: tuple[float, float, float, float],
                     turn: float) -> np.ndarray:
    """Each polygon (each part of a multipolygon: one split at the antimeridian has a part at each end of
    -180..180) moved by the whole turns of longitude that put it on the raster's [xmin, xmax]; on a raster
    that reaches past the antimeridian on both sides (the world) a polygon across it lies at both ends. As
    it was where it lies nowhere on them."""
    left, right = raster_bounds[0], raster_bounds[2]

    def shifts(part: shapely.Geometry) -> list[float]:
        x0, _, x1, _ = part.bounds
        found = [k * turn for k in range(math.floor((left - x1) / turn), math.ceil((right - x0) / turn) + 1)
                 if min(x1 + k * turn, right) - max(x0 + k * turn, left) > 1e-12]
        return found or [0.0]

    def moved(geometry: shapely.Geometry, by: float) -> shapely.Geometry:
        return shapely.transform(geometry, lambda xy: xy + np.array([by, 0.0])) if by else geometry

    def strip(part: shapely.Geometry) -> shapely.Geometry:
        _, y0, _, y1 = part.bounds
        return shapely.box(left, y0 - 1, right, y1 + 1)

    out = []
    for geometry in geometries:
        parts = shapely.get_parts(geometry)
        found = [shifts(part) for part in parts]
        if not found:
            out.append(geometry)
        elif all(f == found[0] for f in found) and len(found[0]) == 1:
            out.append(moved(geometry, found[0][0]))
        else:  # parts moved apart, or repeated (each repeat cut to the raster's longitudes): one geometry of them
            out.append(shapely.union_all([moved(part, by) if len(by_part) == 1 else
                                          shapely.intersection(moved(part, by), strip(part))
                                          for part, by_part in zip(parts, found) for by in by_part]))
    return np.array(out, dtype=object)


def label_layer(labels: str | Path, class_field: str, option: str = "--class-field") -> tuple[Path, str | None]:
    """The file and layer of labelled polygons given as a file, a folder of vector data or
    `path|layername=NAME`, checked to hold `class_field` (cheap: the layer list and field names, no
    features). `option` is how the user names the class field."""
    path, layer = split_layer(labels)
    path = check_vector_source(path, "labels")
    try:
        layer = _choose_layer(path, layer, "labels", class_field)
    except InputError:
        if path.is_dir():
            raise InputError(f"The labels {path} is a folder, and not one of vector data (such as a folder of "
                             "shapefiles); give the labels file (GeoPackage, Shapefile or GeoJSON).") from None
        raise
    available = _fields(path, layer, "labels")
    if class_field not in available and _feature_count(path, layer) == 0:  # an empty GeoJSON has no fields
        raise InputError(f"The labels file {path.name} holds no features.")
    if class_field not in available:
        hint = ", ".join(available[:30]) + (", ..." if len(available) > 30 else "") if available else "(none)"
        raise InputError(f"The labels file {path.name} has no field {class_field!r}; its fields are: {hint}. "
                         f"Give the field that holds the class names with {option}.")
    return path, layer


def read_label_polygons(path: str | Path, class_field: str, raster_crs,
                        class_names: dict[str, str] | None = None,
                        raster_bounds: tuple[float, float, float, float] | None = None) -> LabelPolygons:
    """Read polygons and their class field, reprojected to `raster_crs` (a rasterio CRS); `raster_bounds`
    (the raster's envelope, `raster_envelope`) moves lon/lat polygons by whole turns onto its longitudes."""
    path, layer = label_layer(path, class_field)
    meta, _, wkb, fields = _read_layer(path, layer, [class_field], "labels")
    crs = _layer_crs(meta, path, "labels")
    if wkb is None or len(wkb) == 0:
        raise InputError(f"The labels file {path.name} holds no features.")
    geometries = shapely.from_wkb(wkb)
    values = [_value_text(v) for v in fields[0]]
    features, without_class = len(values), sum(v == "" for v in values)
    has_geometry = np.array([g is not None and not g.is_empty for g in geometries], dtype=bool)
    no_geometry = int(sum(not h and v != "" for h, v in zip(has_geometry, values)))
    keep = np.array([h and v != "" for h, v in zip(has_geometry, values)], dtype=bool)
    geometries = geometries[keep]
    values = [v for v, k in zip(values, keep) if k]
    polygonal = _holds_polygons(geometries)
    if len(geometries) and not polygonal.any():
        raise InputError(f"The labels file {path.name} holds {geometries[0].geom_type} features, not "
                         "polygons; draw the labelled regions as polygons.")
    geometries = _polygonal_parts(geometries[polygonal])
    values = [v for v, k in zip(values, polygonal) if k]
    kept = ~shapely.is_empty(geometries)
    no_area = int((~kept).sum())
    geometries, values = geometries[kept], [v for v, k in zip(values, kept) if k]
    if class_names:
        _check_renamed_values(class_names, [_value_text(v) for v in fields[0]], path)
        values = [class_names.get(v, v) for v in values]
    geometries = _to_raster_crs(geometries, crs, raster_crs, path, raster_bounds)
    polygons = LabelPolygons(geometries, values, path, crs.to_string(), class_field, features, without_class,
                             int((~polygonal).sum()), no_geometry, no_area)
    if path.suffix.lower() == ".shp" and _cpg_file(path) is None:
        polygons.misread = _utf8_read_as_latin1({_value_text(v) for v in fields[0]})
    return polygons


def _cpg_file(path: Path) -> Path | None:
    """The .cpg beside a shapefile, which names the encoding of its text (GDAL reads ISO-8859-1 without one)."""
    return next((p for p in (path.with_suffix(".cpg"), path.with_suffix(".CPG")) if p.is_file()), None)


def _utf8_read_as_latin1(values: set[str]) -> list[tuple[str, str]]:
    """Values that are UTF-8 bytes read as ISO-8859-1 (GDAL's reading of a shapefile without a .cpg): 'forÃªt'
    is 'forêt'. Text that really is ISO-8859-1 ('forêt') is never valid UTF-8 once encoded back, so is not listed."""
    found = []
    for value in sorted(values):
        try:
            meant = value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        if meant != value:
            found.append((value, meant))
    return found


def _check_renamed_values(class_names: dict[str, str], values: list[str], path: Path) -> None:
    """Each label value --class-name renames is one the labels hold (a typo or another letter case would
    otherwise leave the class under its old name while the model's description records the rename)."""
    held = set(values) - {""}
    absent = [value for value in class_names if value not in held]
    if absent:
        shown = ", ".join(repr(v) for v in sorted(held)[:20]) + (", ..." if len(held) > 20 else "")
        raise InputError(f"--class-name renames the label value{'s' if len(absent) > 1 else ''} "
                         f"{', '.join(repr(v) for v in absent)}, which no feature of {path.name} holds (label values "
                         f"are matched exactly, letter case included); its values are: {shown}.")


def aoi_layer(source: str | Path) -> tuple[Path, str | None]:
    """The file and layer of an area of interest given as a file or `path|layername=NAME`."""
    path, layer = split_layer(source)
    check_vector_source(path, "area-of-interest")
    return path, _choose_layer(path, layer, "area-of-interest")


def read_aoi(path: str | Path, raster_crs,
             raster_bounds: tuple[float, float, float, float] | None = None) -> shapely.Geometry:
    """The union of an area-of-interest layer's polygons, in the raster's CRS."""
    path, layer = aoi_layer(path)
    meta, _, wkb, _ = _read_layer(path, layer, [], "area-of-interest")
    crs = _layer_crs(meta, path, "area-of-interest")
    geometries = shapely.from_wkb(wkb) if wkb is not None else np.array([])
    geometries = geometries[_holds_polygons(geometries)] if len(geometries) else geometries
    geometries = _polygonal_parts(geometries) if len(geometries) else geometries
    geometries = geometries[~shapely.is_empty(geometries)] if len(geometries) else geometries
    if len(geometries) == 0:
        raise InputError(f"The area-of-interest file {path.name} holds no polygons.")
    return shapely.union_all(_to_raster_crs(geometries, crs, raster_crs, path, raster_bounds))


def raster_envelope(source: RasterSource) -> tuple[float, float, float, float]:
    """The raster's (xmin, ymin, xmax, ymax) in its CRS, for `read_label_polygons` and `read_aoi`."""
    return source.window_bounds(PixelWindow(0, 0, source.height, source.width))


def rasterise(geometries: np.ndarray, class_ids: np.ndarray, window: PixelWindow,
              source: RasterSource) -> np.ndarray:
    """Burn polygons into an int16 grid; smaller polygons win where polygons overlap."""
    shape = (window.height, window.width)
    if len(geometries) == 0:
        return np.full(shape, UNLABELLED, dtype=np.int16)
    order = np.argsort(-shapely.area(geometries), kind="stable")
    return rasterize(((geometries[i], int(class_ids[i])) for i in order), out_shape=shape,
                     transform=source.window_transform(window), fill=UNLABELLED, dtype="int16")


def _contested(geometries: np.ndarray, class_ids: np.ndarray, window: PixelWindow, source: RasterSource,
               counted: np.ndarray) -> int:
    """The pixels of `counted` that polygons of more than one class cover (an overlap, a duplicate feature with
    another class): only the polygons that overlap one of another class are burnt again, a mask per class."""
    tree = shapely.STRtree(geometries)
    left, right = tree.query(geometries, predicate="intersects")
    pairs = (left < right) & (class_ids[left] != class_ids[right])
    left, right = left[pairs], right[pairs]
    pairs = shapely.area(shapely.intersection(geometries[left], geometries[right])) > 0  # not just touching
    if not pairs.any():
        return 0
    involved = np.unique(np.concatenate([left[pairs], right[pairs]]))
    covered = np.zeros(counted.shape, dtype=np.uint8)
    for class_id in np.unique(class_ids[involved]):
        mine = involved[class_ids[involved] == class_id]
        covered += rasterise(geometries[mine], np.zeros(len(mine), dtype=np.int64), window, source) == 0
    return int(((covered > 1) & counted).sum())


def _class_name(value: str) -> str | None:
    """The class a label value names (its first comma-separated part), None when it holds only separators."""
    if not split_class_line(value):
        return None
    return parse_class_lines([value])[0].name


def check_background(background: str | None) -> None:
    """--background names a class (checked before a model loads, and by the server before it queues a job)."""
    if background is not None and _class_name(background) is None:
        raise InputError(f"--background {background!r} names no class (it is blank or made only of separators); "
                         "give the class name that unlabelled pixels should get, e.g. --background 'ground'.")


def check_class_names(class_names: dict[str, str] | None) -> None:
    """Each rename of --class-name (a request's class_names) takes a label value to a class name."""
    for value, name in (class_names or {}).items():
        if not value.strip():
            raise InputError(f"--class-name (class_names) renames the blank label value {value!r}; polygons "
                             "without a class value are not labels, so rename a value the class field holds.")
        if _class_name(name) is None:
            raise InputError(f"--class-name (class_names) renames the label value {value!r} to {name!r}, which "
                             "names no class (it is blank or made only of separators); give that value a class "
                             f"name ({value}=NAME), or leave it out to keep its own.")


def _one_class(label_file: str, value: str, background: str | None) -> InputError:
    if background:
        return InputError(f"The labels in {label_file} hold only one class ({value!r}) and --background "
                          f"{background!r} is that same class; a segmentation needs at least two. Give "
                          "--background another class name, or label another class.")
    return InputError(f"The labels in {label_file} hold only one class ({value!r}); a segmentation "
                      "needs at least two. Label another class, or pass --background NAME to treat "
                      "unlabelled pixels inside the labels' extent as a class.")


def check_two_classes(labels: str | Path, class_field: str, background: str | None = None,
                      class_names: dict[str, str] | None = None) -> None:
    """Before a run reads the raster or loads a model: the labels' class field, renamed by `class_names`, with
    the background class, names at least two classes (the sentence a run would stop on later). Reads that
    one field, no geometry; a feature without a geometry still counts here (the run drops it)."""
    path, layer = label_layer(labels, class_field)
    fields = _read_layer(path, layer, [class_field], "labels", read_geometry=False)[3]
    values = sorted({_value_text(v) for v in fields[0]} - {""})
    if class_names:
        _check_renamed_values(class_names, values, path)
        values = sorted({class_names.get(v, v) for v in values})
    values = [v for v in values if _class_name(v) is not None]  # separators only: refused by the run
    if not values:
        return  # "holds no labelled polygons": said by the run with its reasons
    named = background if background and _class_name(background) is not None else None
    if len(_class_lines_of(values, named, path.name)) < 2:  # the class lines the run would build
        raise _one_class(path.name, values[0], background)


def _class_lines_of(values: list[str], background: str | None, label_file: str) -> list[str]:
    """The sorted label values, then the background class unless a label value names it already."""
    seen: dict[str, str] = {}
    clashes: list[tuple[str, str]] = []  # every pair, told at once: one run to learn each of them was a run each
    for value in values:
        key = str(_class_name(value)).lower()
        if key in seen:
            clashes.append((seen[key], value))
        else:
            seen[key] = value
    if clashes:
        pairs = "; ".join(f"{first!r} and {other!r}" for first, other in clashes)
        merge = " ".join(f"--class-name '{other}={first}'" for first, other in clashes)
        # Values told apart only after a comma ('Forest, deciduous' and 'Forest, coniferous') are two classes to
        # the analyst: they are renamed apart, not merged (the name is the text before the first comma).
        commas = next(((first, other) for first, other in clashes if first.lower() != other.lower()), None)
        apart = (f"; if they are different classes, give one a name of its own, e.g. --class-name "
                 f"'{commas[1]}={commas[1].replace(',', '').replace(';', '')}'" if commas else "")
        raise InputError(f"The label values {pairs} in {label_file} name the same class "
                         "(letter case and synonyms after a comma do not tell classes apart); spell them "
                         f"the same way in the labels, or merge them with {merge}{apart}.")
    if background and str(_class_name(background)).lower() not in seen:
        return [*values, background]
    return list(values)


def _on_pixels(geometries, transform):
    """Geometries (one or an array) in map coordinates -> in (column, row) pixel coordinates of `transform`."""
    inverse = ~transform
    return shapely.transform(geometries, lambda xy: np.column_stack(inverse @ (xy[:, 0], xy[:, 1])))


def _on_map(geometry: shapely.Geometry, transform) -> shapely.Geometry:
    return shapely.transform(geometry, lambda xy: np.column_stack(transform @ (xy[:, 0], xy[:, 1])))


def _pixel_window(source: RasterSource, geometry: shapely.Geometry) -> PixelWindow | None:
    """The processing-grid pixels under `geometry`'s box on the pixel grid, clipped to the raster (its map
    envelope's window on a rotated raster would take in pixels far from it); None when none."""
    return _clipped_window(source, *_on_pixels(geometry, source.transform).bounds)


def _clipped_window(source: RasterSource, col0: float, row0: float, col1: float, row1: float) -> PixelWindow | None:
    row0, col0 = max(0, math.floor(row0 + 1e-6)), max(0, math.floor(col0 + 1e-6))
    row1, col1 = min(source.height, math.ceil(row1 - 1e-6)), min(source.width, math.ceil(col1 - 1e-6))
    if row1 <= row0 or col1 <= col0:
        return None
    return PixelWindow(row0, col0, row1 - row0, col1 - col0)


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
    empty = next((v for v in values if _class_name(v) is None), None)
    if empty is not None:
        raise InputError(f"The label value {empty!r} in {label_file} is made only of separators (commas, "
                         f"semicolons), so it names no class; fix it in the labels or rename it with "
                         f"--class-name '{empty}=NAME'.")
    check_background(background)
    if class_lines is None:
        class_lines = _class_lines_of(values, background, label_file)
    names = [spec.name.lower() for spec in parse_class_lines(class_lines)]
    lookup = {line.lower(): i for i, line in enumerate(class_lines)}
    lookup.update({name: i for i, name in enumerate(names)})

    def index_of(value: str) -> int | None:
        found = lookup.get(value.lower())
        name = _class_name(value)
        return found if found is not None or name is None else lookup.get(name.lower())

    missing = [v for v in values if index_of(v) is None]
    if missing:
        raise InputError(f"The label classes {missing} are not among the model's classes {class_lines}.")
    background_id = index_of(background) if background else None
    if background and background_id is None:
        raise InputError(f"The --background class {background!r} is not among the model's classes "
                         f"{class_lines}; give one of them, or leave --background out.")
    if len(class_lines) < 2:
        raise _one_class(label_file, values[0], background)
    class_ids = np.array([index_of(v) for v in polygons.class_values], dtype=np.int64)

    # The labels' extent is their bounding box on the pixel grid (a rotated rectangle in map coordinates
    # on a rotated raster, whose map envelope would take in unlabelled pixels beyond the labels).
    extent = aoi if aoi is not None else _on_map(shapely.box(*shapely.total_bounds(
        _on_pixels(polygons.geometries, source.transform))), source.transform)
    footprint = _on_map(shapely.box(0, 0, source.width, source.height), source.transform)
    rx0, ry0, rx1, ry1 = footprint.bounds
    polygons.outside = int((~shapely.intersects(polygons.geometries, footprint)
                            | shapely.touches(polygons.geometries, footprint)).sum())
    crs = source.crs
    in_raster_crs = f"in the raster's CRS {crs.to_string()}"
    if aoi is not None and not shapely.intersects(aoi, footprint):
        ax0, ay0, ax1, ay1 = aoi.bounds
        raise InputError(f"The area of interest does not overlap the raster {source.path.name}: it covers x "
                         f"{coordinates(crs, ax0, ax1)}, y {coordinates(crs, ay0, ay1)} and the raster x "
                         f"{coordinates(crs, rx0, rx1)}, y {coordinates(crs, ry0, ry1)} ({in_raster_crs}); give an "
                         "--aoi that lies on the raster.")
    window = _pixel_window(source, extent)
    union = shapely.union_all(polygons.geometries)
    if window is None or not shapely.intersects(union, footprint):
        lx0, ly0, lx1, ly1 = shapely.total_bounds(polygons.geometries)
        raise InputError(f"The labels in {label_file} do not overlap the raster {source.path.name}: the "
                         f"labels cover x {coordinates(crs, lx0, lx1)}, y {coordinates(crs, ly0, ly1)} and the raster "
                         f"x {coordinates(crs, rx0, rx1)}, y {coordinates(crs, ry0, ry1)} ({in_raster_crs}; the "
                         f"labels were in {polygons.source_crs}).")
    if aoi is not None and not shapely.intersects(union, shapely.intersection(aoi, footprint)):
        raise InputError(f"The labels in {label_file} lie outside the area of interest (where it covers the "
                         f"raster {source.path.name}); give an --aoi that holds labelled polygons.")

    labels = rasterise(polygons.geometries, class_ids, window, source)
    region = None
    if background or aoi is not None:
        region = rasterise(np.array([extent]), np.array([1]), window, source) == 1
        if aoi is not None:  # the area of interest is its polygons, not their bounding box
            labels[~region] = UNLABELLED
    _, valid = source.read(window)
    polygons.labelled_pixels = int((labels >= 0).sum())
    polygons.on_nodata = int(((labels >= 0) & ~valid).sum())
    polygons.contested = _contested(polygons.geometries, class_ids, window, source, (labels >= 0) & valid)
    if background and region is not None:
        labels[(labels == UNLABELLED) & region] = background_id
    labels[~valid] = UNLABELLED

    labelled = int((labels >= 0).sum())
    if labelled < min_labelled_pixels:
        raise InputError(f"Only {labelled} pixels of the raster are labelled by {label_file}; at least "
                         f"{min_labelled_pixels} are needed. Draw more or larger polygons (or check they "
                         "fall on valid, non-nodata pixels).")
    present = np.unique(labels[labels >= 0])
    if len(present) < 2:
        fix = ("; --background fills only the pixels inside the labels' extent (or --aoi) that no polygon "
               "covers" if background else ", or pass --background NAME")
        raise InputError(f"The labels in {label_file} cover only one class ({class_lines[present[0]]!r}) "
                         f"on the raster's valid pixels; a segmentation needs at least two. Label another "
                         f"class{fix}.")
    absent = [class_lines[i] for i in sorted(set(class_ids.tolist()) - set(present.tolist()))]
    return LabelGrid(labels, window, list(class_lines), background, polygons, class_ids, absent)

