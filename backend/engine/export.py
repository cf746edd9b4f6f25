"""Writing results: polygon layers and run reports, each atomically (backend.engine.atomic)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyogrio.raw
import shapely

from backend.engine.diskspace import NEARLY_FULL_BYTES, free_bytes, no_space_error
from backend.engine.errors import InputError
from backend.engine.atomic import atomic_output
from backend.engine.ground import crs_label

if TYPE_CHECKING:  # vectorize imports scipy: a check of the output's name does not need it
    from backend.engine.vectorize import RegionPolygon

DRIVERS = {".gpkg": "GPKG", ".shp": "ESRI Shapefile", ".geojson": "GeoJSON", ".fgb": "FlatGeobuf"}
FIELDS = ("class", "class_id", "score_mean", "score_max", "area_m2", "model", "run_id", "object_id")


def driver_for(path: str | Path) -> str:
    """The OGR driver for an output path, chosen by its extension."""
    given = Path(path).suffix
    suffix = given.lower()
    if suffix == ".parquet":  # GeoParquet: the merged layer of a run on Ray (backend/scale/merge.py)
        raise InputError(f"Cannot write polygons to {path}: GeoParquet is written by runs on Ray; add --workers 1 to "
                         f"run this one on a local Ray, or use one of {', '.join(DRIVERS)}.")
    if not suffix and Path(path).is_dir():
        raise InputError(f"Cannot write polygons to {path}: it is a folder; name a file in it, e.g. "
                         f"{Path(path) / 'result.gpkg'}.")
    if suffix not in DRIVERS:
        raise InputError(
            f"Cannot write polygons to {path}: the extension {suffix or '(none)'!r} is not supported. "
            f"Use one of {', '.join(DRIVERS)} (.gpkg is the default)."
        )
    if suffix == ".shp" and given not in (".shp", ".SHP"):
        raise InputError(f"Cannot write polygons to {path}: a shapefile's extension is .shp or .SHP; GDAL, and so "
                         f"QGIS, finds no shapefile named {given}.")
    return DRIVERS[suffix]


SHAPEFILE_TEXT_BYTES = 254  # a dBase text field holds at most this many bytes


def check_format_crs(path: str | Path, crs) -> list[str]:
    """GeoJSON records a CRS only by its code (EPSG, ESRI): a raster in a CRS without one (a PROJ string, a
    custom WKT) gave a file that every reader, farslip evaluate included, took for WGS 84 degrees while
    its coordinates were metres. Refused before the run, naming the formats that keep any CRS.

    Returns the warning for GeoJSON written with a code other than WGS 84 longitude/latitude: GDAL and QGIS read
    the CRS it names, but RFC 7946 (web maps, geojson.io, GitHub's preview) says a GeoJSON's coordinates are WGS 84
    degrees, and such readers put the polygons elsewhere (the polygons stay in the raster's CRS, as every
    output's do)."""
    if driver_for(path) != "GeoJSON" or crs is None:
        return []
    from pyproj import CRS as ProjCRS

    # The code GDAL writes is the one the CRS's definition carries at its root, not one found by matching
    # (a VRT over a PROJ string matches EPSG:32633 and still gave a file without a CRS).
    try:
        parsed = ProjCRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        root = parsed.to_json_dict().get("id")
    except Exception:  # pyproj raises several types for definitions it cannot read
        parsed, root = None, None
    name = Path(path).name
    if isinstance(root, dict) and root.get("authority") in ("EPSG", "ESRI"):
        assert parsed is not None, "a CRS with a code at its root was parsed"
        if parsed.is_geographic and parsed.equals(ProjCRS.from_epsg(4326), ignore_axis_order=True):
            return []
        return [f"{name} is in {crs_label(crs)}, the raster's CRS, which it names; GDAL and QGIS read it, but web "
                "maps and other readers that follow RFC 7946 take GeoJSON for WGS 84 degrees and will misplace it. "
                "Write .gpkg for GIS use, or reproject the file for the web (ogr2ogr -t_srs EPSG:4326)."]
    if parsed is not None and parsed.is_compound:
        raise InputError(f"GeoJSON can record only a CRS with one EPSG code, and this result's CRS is a compound "
                         f"CRS ({crs_label(parsed)}): GDAL would write no CRS, and readers would take {name} for "
                         "WGS 84 degrees. Write .gpkg instead (or .fgb or .shp), which keeps any CRS.")
    raise InputError(f"GeoJSON cannot record the CRS of this result ({crs_label(crs)}), which has no EPSG code: "
                     f"readers would take {name} for WGS 84 degrees. Write .gpkg, .fgb or .shp "
                     "instead, which keep any CRS.")


def check_field_widths(path: str | Path, class_names: Sequence[str], what: str = "class name",
                       field: str = "") -> None:
    """A shapefile cannot hold long texts (class names, search sentences); say so before the run rather
    than write them cut. `what` names the text in the sentence, `field` the shapefile's field."""
    if driver_for(path) != "ESRI Shapefile":
        return
    for name in class_names:
        if len(name.encode("utf-8")) > SHAPEFILE_TEXT_BYTES:
            holder = f"a shapefile's {field} field" if field else "a shapefile"
            raise InputError(f"The {what} {name[:40]!r}... is {len(name.encode('utf-8'))} bytes long; {holder} "
                             f"holds at most {SHAPEFILE_TEXT_BYTES}. Shorten it, or write a GeoPackage (.gpkg).")


def _field_arrays(
    regions: Sequence[RegionPolygon], class_names: Sequence[str] | Mapping[int, str], model: str, run_id: str
) -> list[np.ndarray]:
    return [
        np.array([class_names[r.class_id] for r in regions], dtype=object),
        np.array([r.class_id for r in regions], dtype=np.int32),
        np.array([r.score_mean for r in regions], dtype=np.float64),
        np.array([r.score_max for r in regions], dtype=np.float64),
        np.array([r.area_m2 for r in regions], dtype=np.float64),
        np.array([model] * len(regions), dtype=object),
        np.array([run_id] * len(regions), dtype=object),
        np.arange(1, len(regions) + 1, dtype=np.int64),  # one id per object (connected region of a class)
    ]


def write_polygons(
    path: str | Path,
    regions: Sequence[RegionPolygon],
    crs,
    class_names: Sequence[str] | Mapping[int, str],
    model: str,
    run_id: str,
    extra: Mapping[str, np.ndarray] | None = None,
    tag: str | None = None,
    layer: str | None = None,
    keep_from: Path | None = None,
) -> Path:
    """Write `regions` as a polygon layer named after the file, in the format of its extension, atomically
    (`layer`, `keep_from`: see write_layer).

    `extra` adds float columns after the standard fields (e.g. the quality signals), one value per region.

    Fields: class (from `class_names[class_id]`), class_id, score_mean, score_max, area_m2, model,
    run_id, object_id (1..n). `crs` is the raster's CRS (rasterio/pyproj CRS, WKT or "EPSG:n"). All
    geometries are written as Polygon, or all as MultiPolygon when any region is one. An empty
    `regions` gives a valid empty layer with the same schema.
    """
    path = Path(path)
    driver_for(path)
    geometries = np.array([r.geometry for r in regions], dtype=object)
    multi = bool(len(geometries)) and bool((shapely.get_type_id(geometries) == 6).any())
    if multi:
        geometries = np.array(
            [shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g for g in geometries]
        )
    fields = dict(zip(FIELDS, _field_arrays(regions, class_names, model, run_id)))
    fields.update({name: np.asarray(values, dtype=np.float64) for name, values in (extra or {}).items()})
    return write_layer(path, geometries, fields, "MultiPolygon" if multi else "Polygon", crs, tag, layer, keep_from)


def write_layer(path: Path, geometries: np.ndarray, fields: Mapping[str, np.ndarray], geometry_type: str,
                 crs, tag: str | None = None, layer: str | None = None, keep_from: Path | None = None) -> Path:
    """One layer named after the file, in the format of its extension, written atomically (`layer`
    given: straight into `path`, which the caller staged and renames itself; `keep_from` is then the
    file it replaces). A GeoPackage written over one that holds other layers keeps them (keep_layers)."""
    driver = driver_for(path)
    wkb = shapely.to_wkb(geometries) if len(geometries) else np.array([], dtype=object)
    options: dict[str, object] = {"encoding": "UTF-8"} if driver == "ESRI Shapefile" else {}
    if driver == "GPKG":
        options["dataset_options"] = {"VERSION": "1.2"}  # QGIS 3.22's GDAL reads 1.4 with a warning
        options["layer_options"] = {"OVERWRITE": "YES"}  # a kept file's layer of this name in any case (keep_layers)
    payload = sum(map(len, wkb)) + 8 * len(wkb) * len(fields)

    def write(target: Path, layer: str) -> None:
        _write_or_say_why(target, payload=payload, layer=layer, geometry=wkb, field_data=list(fields.values()),
                          fields=list(fields), driver=driver, geometry_type=geometry_type,
                          crs=crs.to_wkt() if hasattr(crs, "to_wkt") else crs, **options)

    if layer is not None:  # the caller writes into a name it staged itself
        if keep_from is not None:
            keep_layers(Path(keep_from), path, layer_name(layer, driver))
        write(path, layer=layer_name(layer, driver))
        return path
    with atomic_output(path, tag) as temp_path:
        keep_layers(path, temp_path, layer_name(path.stem, driver))
        write(temp_path, layer=layer_name(path.stem, driver))
    return path


def _write_or_say_why(path: Path, *, payload: int, **arguments: object) -> None:
    """pyogrio.raw.write; a failure in a folder left without room for the layer is said as a full disk: GDAL's
    GeoPackage and FlatGeobuf writers report it as 'Failed to commit transaction' or 'Unexpected I/O failure'
    (a traceback, exit 1), and SQLite's roll-back has freed the space by the time the error arrives, so the
    layer's own size (`payload`, its geometries and fields in bytes; a GeoPackage needs it about twice, with
    its journal) is what the free space is compared with."""
    try:
        pyogrio.raw.write(path, **arguments)
    except Exception as error:
        needed = 2 * payload + NEARLY_FULL_BYTES
        free = free_bytes(Path(path).parent)
        if free is not None and free < needed:
            raise no_space_error(output_named_by(Path(path)), needed / 2**20) from error
        raise


def output_named_by(written: Path) -> Path:
    """The output a staged file (`.NAME.farslip-TAG.tmp.gpkg`) becomes: the name a sentence gives the user."""
    name = written.name
    if name.startswith(".") and ".farslip-" in name:
        return written.with_name(name[1:name.index(".farslip-")])
    return written


def keep_layers(target: Path, staged: Path, layer: str) -> list[str]:
    """Start `staged` as a copy of `target` when `target` is a GeoPackage that holds tables other than `layer`
    (vector layers, raster tiles, attribute tables), so that the result replaces only its own layer (a
    GeoPackage is often a project's store: roads, parcels, an orthophoto; --overwrite replaced the whole
    file). The copy is SQLite's own backup, so changes still in the journal of a program that has the file
    open are in it. Returns the tables kept."""
    if driver_for(target) != "GPKG" or not target.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(target).resolve().as_uri()}?mode=ro", uri=True)) as source:
            tables = [str(row[0]) for row in source.execute("SELECT table_name FROM gpkg_contents")]
            kept = [name for name in tables if name.lower() != layer.lower()]  # GeoPackage names ignore case
            if kept:
                with contextlib.closing(sqlite3.connect(staged)) as copy:
                    source.backup(copy)
    except sqlite3.Error:  # not a GeoPackage SQLite can read (damaged, empty): replaced as a whole, as asked
        staged.unlink(missing_ok=True)
        return []
    return kept


# What a GeoPackage's gpkg_contents calls its tables, in a sentence.
TABLE_KINDS = {"tiles": "raster (tiles)", "2d-gridded-coverage": "gridded coverage (raster)",
               "attributes": "attribute (non-spatial)"}


def check_gpkg_layer_free(path: Path, what: str) -> None:
    """Refuse, before a run, a GeoPackage output that holds a table of the result layer's name which is not a
    vector layer (an orthophoto's tiles, an attribute table, a plain SQLite table): the layer could not be
    written over it (the run ended in a traceback after all its work) and it is the user's data. A vector
    layer of that name is the one --overwrite replaces; other tables are kept (keep_layers)."""
    if path.suffix.lower() != ".gpkg" or not path.is_file():
        return
    layer = layer_name(path.stem, "GPKG")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            named = db.execute("SELECT type, name FROM sqlite_master WHERE lower(name) = lower(?)", (layer,)).fetchone()
            if named is None:
                return
            row = db.execute("SELECT data_type FROM gpkg_contents WHERE lower(table_name) = lower(?)",
                             (layer,)).fetchone()
    except sqlite3.Error:  # not a GeoPackage SQLite can read: replaced as a whole, as asked
        return
    if row is not None and str(row[0]).lower() == "features":
        return
    kind = TABLE_KINDS.get(str(row[0]).lower(), f"'{row[0]}'") if row is not None else (
        "SQLite view" if named[0] == "view" else "SQLite table (not a GeoPackage layer)")
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    raise InputError(f"The {what} {path} already holds {article} {kind} table named '{named[1]}', the name the "
                     "result's layer takes from the file name; it is kept, not replaced: choose another output name.")


RESERVED_TABLE_PREFIXES = ("gpkg", "rtree_", "sqlite_")


def layer_name(name: str, driver: str) -> str:
    """The layer's name in the file: a GeoPackage reserves names that begin with 'gpkg' (its own tables),
    'rtree_' (its spatial indexes) and 'sqlite_' (SQLite's), so the layer of gpkg_ortho.gpkg is _gpkg_ortho
    and that of sqlite_res.gpkg _sqlite_res (GDAL refused them and the run ended in a traceback)."""
    return f"_{name}" if driver == "GPKG" and name.lower().startswith(RESERVED_TABLE_PREFIXES) else name


def report_path_for(vector_path: str | Path) -> Path:
    """The run report beside a result: result.gpkg -> result.report.json."""
    return Path(vector_path).with_suffix(".report.json")


def write_report(path: str | Path, report: Mapping, tag: str | None = None) -> Path:
    """Write a run report as indented UTF-8 JSON, atomically (paths and other objects as strings)."""
    path = Path(path)
    with atomic_output(path, tag) as temp_path:
        temp_path.write_text(report_json(report), "utf-8")
    return path


def report_json(report: Mapping) -> str:
    """A run report as indented JSON text (paths and other objects as strings)."""
    return json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"

