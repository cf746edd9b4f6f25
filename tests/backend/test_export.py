"""Polygon layers, reports and colours: formats, schema, CRS, atomic writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS

from backend.engine import export
from backend.engine.errors import InputError
from backend.engine.export import (
    FIELDS,
    report_path_for,
    write_polygons,
    write_report,
)
from backend.engine.vectorize import RegionPolygon, finalize, vectorize_class_raster

UTM = CRS.from_epsg(32633)
TRANSFORM = Affine(2.0, 0.0, 500000.0, 0.0, -2.0, 4000000.0)
CLASS_NAMES = ["water", "tree, forest", "building"]


@pytest.fixture
def regions(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rasters")
    classes = np.zeros((30, 20), np.uint8)
    classes[5:25, 2:8] = 1
    classes[10:15, 10:18] = 2
    classes[12, 12] = 1
    classes[:, 19] = 255
    scores = np.random.default_rng(0).random(classes.shape).astype(np.float32)
    paths = []
    for name, array in (("classes.tif", classes), ("scores.tif", scores)):
        paths.append(directory / name)
        with rasterio.open(
            paths[-1],
            "w",
            driver="GTiff",
            width=20,
            height=30,
            count=1,
            dtype=array.dtype,
            crs=UTM,
            transform=TRANSFORM,
        ) as dataset:
            dataset.write(array, 1)
    return finalize(vectorize_class_raster(paths[0], paths[1], strip_rows=7), UTM, TRANSFORM)


def read_layer(path):
    meta, _, geometry, field_data = pyogrio.raw.read(path)
    records = sorted(
        (tuple(column[i] for column in field_data), shapely.from_wkb(geometry[i]).normalize().wkt)
        for i in range(len(geometry))
    )
    return meta, records


def assert_same_features(records, expected):
    """Same features; floats to 1e-12 (a DBF stores 15 decimals, GeoJSON 15 significant digits)."""
    assert len(records) == len(expected)
    for (fields, wkt), (expected_fields, expected_wkt) in zip(records, expected):
        assert wkt == expected_wkt
        for value, expected_value in zip(fields, expected_fields):
            if isinstance(expected_value, float):
                assert value == pytest.approx(expected_value, rel=1e-12, nan_ok=True)
            else:
                assert value == expected_value


def test_geopackage_has_the_schema_crs_layer_name_and_values(tmp_path, regions):
    path = write_polygons(tmp_path / "result.gpkg", regions, UTM, CLASS_NAMES, "farslip2-vit-b-16", "run42")
    assert pyogrio.list_layers(path)[:, 0].tolist() == ["result"]
    info = pyogrio.read_info(path)
    assert tuple(info["fields"]) == FIELDS
    assert info["geometry_type"] == "Polygon"
    assert CRS.from_user_input(info["crs"]) == UTM
    assert info["features"] == len(regions)
    _meta, records = read_layer(path)
    assert {r[0][0] for r in records} == {"water", "tree, forest", "building"}
    by_geometry = {shapely.normalize(r.geometry).wkt: r for r in regions}
    for (name, class_id, score_mean, score_max, area_m2, model, run_id, _object_id), wkt in records:
        region = by_geometry[wkt]
        assert (name, class_id, model, run_id) == (
            CLASS_NAMES[region.class_id],
            region.class_id,
            "farslip2-vit-b-16",
            "run42",
        )
        assert score_mean == pytest.approx(region.score_mean) and score_max == pytest.approx(region.score_max)
        assert area_m2 == pytest.approx(region.area_m2)


def test_shapefile_has_valid_field_names_and_the_same_features_as_the_geopackage(tmp_path, regions):
    gpkg = write_polygons(tmp_path / "result.gpkg", regions, UTM, CLASS_NAMES, "m", "r")
    shp = write_polygons(tmp_path / "result.shp", regions, UTM, CLASS_NAMES, "m", "r")
    assert all(len(name) <= 10 for name in FIELDS)
    assert tuple(pyogrio.read_info(shp)["fields"]) == FIELDS
    assert sorted(p.name for p in tmp_path.iterdir() if p.stem == "result" and p.suffix != ".gpkg") == [
        "result.cpg",
        "result.dbf",
        "result.prj",
        "result.shp",
        "result.shx",
    ]
    assert_same_features(read_layer(shp)[1], read_layer(gpkg)[1])


@pytest.mark.parametrize("suffix", [".geojson", ".fgb"])
def test_other_formats_read_back_with_the_same_features(tmp_path, regions, suffix):
    gpkg = write_polygons(tmp_path / "a.gpkg", regions, UTM, CLASS_NAMES, "m", "r")
    other = write_polygons(tmp_path / f"a{suffix}", regions, UTM, CLASS_NAMES, "m", "r")
    assert_same_features(read_layer(other)[1], read_layer(gpkg)[1])
    assert CRS.from_user_input(pyogrio.read_info(other)["crs"]) == UTM


def test_unknown_extension_is_rejected_with_the_supported_list(tmp_path, regions):
    with pytest.raises(InputError, match=r"\.gpkg"):
        write_polygons(tmp_path / "result.kml", regions, UTM, CLASS_NAMES, "m", "r")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".gpkg", ".shp", ".fgb", ".geojson"])
def test_empty_result_is_a_valid_empty_layer(tmp_path, suffix):
    path = write_polygons(tmp_path / f"empty{suffix}", [], UTM, CLASS_NAMES, "m", "r")
    info = pyogrio.read_info(path)
    assert len(pyogrio.raw.read(path)[2]) == 0  # (FlatGeobuf reports an unknown count, -1)
    if suffix != ".geojson":  # GeoJSON has no schema without features
        assert tuple(info["fields"]) == FIELDS


def test_multipolygons_promote_the_whole_layer(tmp_path, regions):
    multi = RegionPolygon(
        shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]), 0, 2, 1.0, 0.5, 2.0
    )
    path = write_polygons(tmp_path / "multi.gpkg", [*regions, multi], UTM, CLASS_NAMES, "m", "r")
    info = pyogrio.read_info(path)
    assert info["geometry_type"] == "MultiPolygon"
    _, _, geometry, _ = pyogrio.raw.read(path)
    assert set(shapely.get_type_id(shapely.from_wkb(geometry))) == {6}


def test_nan_scores_are_written_as_null(tmp_path):
    region = RegionPolygon(shapely.box(0, 0, 2, 2), 0, 1, math.nan, math.nan, 4.0)
    path = write_polygons(tmp_path / "nan.gpkg", [region], UTM, CLASS_NAMES, "m", "r")
    _, _, _, field_data = pyogrio.raw.read(path)
    assert math.isnan(field_data[2][0]) and math.isnan(field_data[3][0])


@pytest.mark.parametrize("suffix", [".gpkg", ".shp"])
def test_failed_write_leaves_nothing_and_keeps_the_old_result(tmp_path, regions, monkeypatch, suffix):
    path = write_polygons(tmp_path / f"result{suffix}", regions, UTM, CLASS_NAMES, "m", "old")
    before = sorted(p.name for p in tmp_path.iterdir())
    real_write = pyogrio.raw.write

    def write_then_fail(temp_path, *args, **kwargs):
        real_write(temp_path, *args, **kwargs)  # the temporary files really exist ...
        raise RuntimeError("disk full")  # ... when the writer fails

    monkeypatch.setattr(export.pyogrio.raw, "write", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_polygons(path, regions[:1], UTM, CLASS_NAMES, "m", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert set(pyogrio.raw.read(path)[3][6]) == {"old"}


def test_replacing_a_shapefile_removes_its_stale_sidecars(tmp_path, regions):
    path = write_polygons(tmp_path / "result.shp", regions, UTM, CLASS_NAMES, "m", "r")
    (tmp_path / "result.qix").write_bytes(b"old spatial index")
    (tmp_path / "result.qpj").write_text("an old QGIS CRS file")
    (tmp_path / "result.shp.xml").write_text("<metadata>ArcGIS's description of the old data</metadata>")
    write_polygons(path, regions[:1], UTM, CLASS_NAMES, "m", "r")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"result{part}" for part in (".cpg", ".dbf", ".prj",
                                                                                         ".shp", ".shx")]
    assert pyogrio.read_info(path)["features"] == 1


def test_a_shapefile_named_in_capitals_is_written_with_every_part_in_capitals(tmp_path, regions):
    """GDAL writes RESULT.shp, RESULT.dbf ... for RESULT.SHP: the atomic rename looked for the staged .SHP and the run
    failed after all its work. The parts follow the user's case, so the name given opens (GDAL, QGIS)."""
    path = write_polygons(tmp_path / "RESULT.SHP", regions, UTM, CLASS_NAMES, "m", "r")
    assert path == tmp_path / "RESULT.SHP"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULT.CPG", "RESULT.DBF", "RESULT.PRJ", "RESULT.SHP",
                                                          "RESULT.SHX"]
    info = pyogrio.read_info(path)
    assert info["features"] == len(regions) and info["encoding"] == "UTF-8"  # the .CPG is read
    assert CRS.from_user_input(info["crs"]) == UTM
    gpkg = write_polygons(tmp_path / "result.gpkg", regions, UTM, CLASS_NAMES, "m", "r")
    assert_same_features(read_layer(path)[1], read_layer(gpkg)[1])


def test_a_shapefile_in_capitals_replaces_the_lower_case_one_of_its_name(tmp_path, regions):
    """Where the file system tells case apart, GDAL opening R.SHP reads an old r.shp/R.shx/R.dbf first: the
    replaced shapefile's parts of the other case go, and the new one reads back."""
    write_polygons(tmp_path / "R.shp", regions, UTM, CLASS_NAMES, "m", "old")
    (tmp_path / "R.qix").write_bytes(b"old spatial index")
    path = write_polygons(tmp_path / "R.SHP", regions[:1], UTM, CLASS_NAMES, "m", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.CPG", "R.DBF", "R.PRJ", "R.SHP", "R.SHX"]
    assert pyogrio.read_info(path)["features"] == 1 and set(pyogrio.raw.read(path)[3][6]) == {"new"}


@pytest.mark.parametrize("name", ["A.GPKG", "A.GeoJSON", "A.FGB", "A.Gpkg"])
def test_other_formats_named_in_capitals_are_written_under_that_name(tmp_path, regions, name):
    path = write_polygons(tmp_path / name, regions, UTM, CLASS_NAMES, "m", "r")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert pyogrio.read_info(path)["features"] in (len(regions), -1)
    assert len(read_layer(path)[1]) == len(regions)


def test_a_shapefile_extension_in_mixed_case_is_refused(tmp_path, regions):
    """GDAL opens a shapefile by x.shp or X.SHP only: a written R.Shp could not be opened by its own name."""
    with pytest.raises(InputError, match=r"extension is \.shp or \.SHP; GDAL, and so QGIS, finds no shapefile "
                                         r"named \.Shp\."):
        write_polygons(tmp_path / "R.Shp", regions, UTM, CLASS_NAMES, "m", "r")
    assert list(tmp_path.iterdir()) == []


def test_report_sits_beside_the_result_and_is_json(tmp_path):
    assert report_path_for(tmp_path / "result.gpkg") == tmp_path / "result.report.json"
    assert report_path_for("a/my.result.shp") == report_path_for("a/my.result.gpkg")
    path = write_report(report_path_for(tmp_path / "result.gpkg"), {"model": "m", "out": tmp_path, "ü": 1})
    assert json.loads(path.read_text("utf-8")) == {"model": "m", "out": str(tmp_path), "ü": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.report.json"]


def many_squares(count: int) -> list[RegionPolygon]:
    """`count` separate 1-pixel squares (a noisy class raster's polygons): a layer of some size."""
    cells = [shapely.box(500000 + 4 * (i % 500), 4000000 - 4 * (i // 500), 500002 + 4 * (i % 500),
                         4000002 - 4 * (i // 500)) for i in range(count)]
    return [RegionPolygon(geometry=cell, class_id=i % 3, pixel_count=1, score_sum=0.5, score_max=0.5,
                          area_m2=4.0) for i, cell in enumerate(cells)]


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb"])
def test_a_layer_the_disk_has_no_room_for_is_said_as_a_full_disk_and_the_old_result_kept(
        tmp_path, monkeypatch, suffix):
    """GDAL's GeoPackage and FlatGeobuf writers say 'Failed to commit transaction' / 'Unexpected I/O failure'
    when the disk fills, and the run ended in that traceback (exit 1). Here the files may grow to 256 kB (as a
    nearly full disk lets them) and the folder reports what such a disk would have free."""
    import resource
    import signal

    target = tmp_path / f"result{suffix}"
    target.write_text("previous result")
    monkeypatch.setattr(export, "free_bytes", lambda folder: 300_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails (EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256_000, hard))
    try:
        with pytest.raises(InputError) as refused:
            write_polygons(target, many_squares(20_000), UTM, CLASS_NAMES, "m", "new")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert str(refused.value).startswith(f"Not enough space on the disk for {target} (needs about ")
    assert target.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("name", ["a;b.gpkg", "what?.fgb", "plot#3.shp", "x;y.geojson"])
def test_a_name_with_a_url_mark_is_written_under_that_name(tmp_path, regions, name):
    """pyogrio reads a path as a URL: `a;b.gpkg` was written to a stray hidden file `.a` and the run ended in a
    traceback (the staged name now has no such mark; the rename gives the name asked for)."""
    import sqlite3

    path = write_polygons(tmp_path / name, regions, UTM, CLASS_NAMES, "m", "r")
    assert path == tmp_path / name
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(path.stem + ".")) == []
    if name.endswith(".gpkg"):
        with sqlite3.connect(path) as db:
            assert db.execute('SELECT count(*) FROM "a;b"').fetchone()[0] == len(regions)


@pytest.mark.parametrize("stem, layer", [("sqlite_res", "_sqlite_res"), ("SQLITE_x", "_SQLITE_x"),
                                         ("rtree_r", "_rtree_r"), ("gpkg_o", "_gpkg_o"), ("plain", "plain")])
def test_a_geopackage_named_like_a_reserved_table_gets_a_layer_it_may_hold(tmp_path, regions, stem, layer):
    """sqlite_res.gpkg ended, after the whole run, in 'object name reserved for internal use'."""
    import sqlite3

    path = write_polygons(tmp_path / f"{stem}.gpkg", regions, UTM, CLASS_NAMES, "m", "r")
    with sqlite3.connect(path) as db:
        assert [row[0] for row in db.execute("SELECT table_name FROM gpkg_contents")] == [layer]
