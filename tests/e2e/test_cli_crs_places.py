"""Places given in one CRS and rasters in another, through `farslip segment/index/search` as a user runs them:
a --like point a whole turn of longitude away from the raster's longitudes, ground sizes of a raster whose
degrees are grads (EPSG:4807, NTF Paris), and the sentences for CRSs that cannot meet (a local grid) or that
GeoJSON cannot record (a compound CRS)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.transform import from_origin
from typer.testing import CliRunner

from backend.service.cli import app

MODEL_ARGS = ["--device", "cpu", "-q"]
SITE_GRID = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def raster(path: Path, crs, transform, width: int = 400, height: int = 300) -> Path:
    """Random RGB pixels (the same for every raster) in `crs` on the grid `transform`."""
    pixels = np.random.default_rng(0).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(pixels)
    return path


def hits(path: Path) -> tuple[list[str], list[bytes], list[float]]:
    """The queries, geometries (WKB) and scales of a hits file, read back."""
    meta, _, geometries, fields = pyogrio.raw.read(path)
    names = list(meta["fields"])
    return (list(fields[names.index("query")]), [bytes(g) for g in geometries],
            [float(v) for v in fields[names.index("scale_m")]])


def lonlat_in(crs: str, lon: float, lat: float) -> tuple[float, float]:
    return Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)


@pytest.mark.parametrize("origin, own, like", [
    # longitudes 200..200.4 (0..360 style) and the same place as -159.85 (in degrees and in Web Mercator)
    ((200.0, 10.0), (200.15, 9.85), [(-159.85, 9.85, "EPSG:4326"), (*lonlat_in("EPSG:3857", -159.85, 9.85),
                                                                   "EPSG:3857")]),
    # across the antimeridian: 179.8..180.2, a point east of it given in -180..180
    ((179.8, -16.0), (180.1, -16.15), [(-179.9, -16.15, "EPSG:4326")]),
], ids=["0-360", "antimeridian"])
def test_a_like_point_a_whole_turn_away_is_the_same_place(tiny_model, tmp_path, origin, own, like):
    """`--bbox` moved longitudes by whole turns onto the raster's and `--like` did not: -159.85 was 'outside the
    raster, which covers x 200..200.4' although it is 200.15E. Now it gives the hits of the raster's own
    longitude, in the CLI and in the server's check of a search request."""
    from backend.service.search_jobs import check_search_request

    tif = raster(tmp_path / "r.tif", "EPSG:4326", from_origin(*origin, 0.001, 0.001))
    assert run("index", tif, "--model", tiny_model, *MODEL_ARGS).exit_code == 0
    mine = run("search", tif, "--like", *own, "--model", tiny_model, *MODEL_ARGS, "-o", tmp_path / "own.gpkg")
    assert mine.exit_code == 0, mine.output
    _, expected, _ = hits(tmp_path / "own.gpkg")
    assert expected
    for i, (x, y, crs) in enumerate(like):
        out = tmp_path / f"like{i}.gpkg"
        result = run("search", tif, "--like", x, y, "--like-crs", crs, "--model", tiny_model, *MODEL_ARGS, "-o", out)
        assert result.exit_code == 0, result.output
        queries, found, _ = hits(out)
        assert found == expected  # the same windows, the example's own left out, in the same order
        assert queries[0].startswith("like ") and queries[0].endswith(f"({crs})")  # the point as the user gave it
        check_search_request({"raster": str(tif), "queries": [], "like": [x, y], "like_crs": crs,
                              "model": str(tiny_model), "out": str(tmp_path / f"server{i}.gpkg")})


def test_a_like_point_in_grads_turns_by_400_grads(tmp_path):
    """A raster in NTF Paris (EPSG:4807) counts longitudes in grads: a whole turn is 400 of them, so -199.8 is
    200.2 on a raster over 200..200.4 (as the server checks a search request; the CLI takes the same path)."""
    from backend.engine.errors import InputError
    from backend.service.search_jobs import _check_raster

    tif = raster(tmp_path / "grads.tif", "EPSG:4807", from_origin(200.0, 50.0, 0.001, 0.001))
    _check_raster({"raster": str(tif), "like": [-199.8, 49.85]})
    _check_raster({"raster": str(tif), "like": [200.2, 49.85]})
    with pytest.raises(InputError, match=r"is outside the raster grads\.tif"):
        _check_raster({"raster": str(tif), "like": [-159.8, 49.85]})  # 360 away: another place in grads


def grads_and_degrees(tmp_path: Path) -> tuple[Path, Path]:
    """The same ground twice: 0.001-grad pixels from 2 grads east of Paris, 50 grads north, in EPSG:4807, and
    0.0009-degree pixels from the same corner in EPSG:4326 (datums apart by less than a pixel)."""
    grads = raster(tmp_path / "grads.tif", "EPSG:4807", from_origin(2.0, 50.0, 0.001, 0.001))
    lon, lat = Transformer.from_crs("EPSG:4807", "EPSG:4326", always_xy=True).transform(2.0, 50.0)
    degrees = raster(tmp_path / "degrees.tif", "EPSG:4326", from_origin(lon, lat, 0.0009, 0.0009))
    return grads, degrees


def test_gsd_on_a_raster_in_grads_gives_the_ground_size_asked(tiny_model, tmp_path):
    """--gsd took EPSG:4807's pixel size in grads for degrees and the latitude in grads for degrees: 20 m asked,
    19.8 x 18.0 m processing pixels (scale [3.589, 5.566]). Now its grads are degrees first: the same scale as
    the raster of the same ground in degrees, and the class raster 20 m pixels on the ground."""
    grads, degrees = grads_and_degrees(tmp_path)
    scales, shapes = [], []
    for tif in (grads, degrees):
        out = tmp_path / f"{tif.stem}.gpkg"
        result = run("segment", tif, "-c", "water", "-c", "road", "--model", tiny_model, *MODEL_ARGS, "--gsd", 20,
                     "--out", out, "--class-raster", tmp_path / f"{tif.stem}-classes.tif")
        assert result.exit_code == 0, result.output
        scales.append(json.loads(out.with_suffix(".report.json").read_text())["processing_scale"])
        with rasterio.open(tmp_path / f"{tif.stem}-classes.tif") as classes:
            shapes.append((classes.width, classes.height))
            assert classes.crs == CRS.from_epsg(4807 if tif == grads else 4326)
    assert scales[0] == pytest.approx(scales[1], rel=1e-3)
    assert scales[0] == pytest.approx([3.55, 5.009], rel=2e-3)  # 100.2 m of latitude, 71.0 m of longitude, /20
    assert shapes[0] == shapes[1]


def test_search_windows_of_a_raster_in_grads_are_their_ground_size(tiny_model, tmp_path):
    """The search index's window sizes in metres (the hits' scale_m) come from the same ground size: a raster in
    grads gets those of the raster of the same ground in degrees (they were 1 % too wide)."""
    scales = []
    for tif in grads_and_degrees(tmp_path):
        out = tmp_path / f"{tif.stem}.gpkg"
        result = run("search", tif, "a lake", "--model", tiny_model, *MODEL_ARGS, "-o", out)
        assert result.exit_code == 0, result.output
        scales.append(sorted(set(hits(out)[2])))
    assert scales[0] == pytest.approx(scales[1], rel=1e-3)


def test_a_bbox_in_degrees_on_a_local_grid_is_refused_in_a_short_sentence(tiny_model, tmp_path):
    """A --bbox in EPSG:4326 on a raster in a local (engineering) CRS cannot be placed: the refusal ended with
    pyproj's exception, a 600-character PROJJSON dump of the site grid. Now one sentence names both CRSs."""
    tif = raster(tmp_path / "local.tif", CRS.from_wkt(SITE_GRID), from_origin(1000, 2000, 1, 1), 200, 200)
    result = run("segment", tif, "-c", "water", "-c", "road", "--model", tiny_model, *MODEL_ARGS,
                 "--bbox", 15, 45, 16, 46, "--bbox-crs", "EPSG:4326", "--out", tmp_path / "l.gpkg")
    assert result.exit_code == 2, result.output
    assert "EPSG:4326" in result.output and "'site grid'" in result.output and "--bbox-crs" in result.output
    assert "{" not in result.output and "schema" not in result.output and len(result.output) < 400, result.output
    assert not (tmp_path / "l.gpkg").exists()
    # The --like point takes the same way (it raised pyproj's error with the same dump).
    result = run("search", tif, "--like", 15, 45, "--like-crs", "EPSG:4326", "--model", tiny_model, *MODEL_ARGS,
                 "-o", tmp_path / "hits.gpkg")
    assert result.exit_code == 2, result.output
    assert "'site grid'" in result.output and "--like-crs" in result.output and "{" not in result.output
    assert not (tmp_path / "hits.gpkg").exists()


def test_geojson_of_a_compound_crs_names_its_parts(tiny_model, tmp_path):
    """GeoJSON of a raster in EPSG:32633+5773 is refused (GDAL would write no CRS), but the sentence said the
    CRS 'has no EPSG code' while its horizontal part is EPSG:32633. Now it names the compound CRS's codes, and
    the .gpkg it suggests keeps that CRS."""
    tif = raster(tmp_path / "compound.tif", CRS.from_user_input("EPSG:32633+5773"),
                 from_origin(500000, 5000000, 2, 2), 200, 200)
    result = run("segment", tif, "-c", "water", "-c", "road", "--model", tiny_model, *MODEL_ARGS,
                 "--out", tmp_path / "c.geojson")
    assert result.exit_code == 2, result.output
    assert "compound CRS (EPSG:32633 + EPSG:5773)" in result.output and ".gpkg" in result.output
    assert "no EPSG code" not in result.output and "COMPD_CS" not in result.output
    assert not (tmp_path / "c.geojson").exists()
    result = run("segment", tif, "-c", "water", "-c", "road", "--model", tiny_model, *MODEL_ARGS,
                 "--out", tmp_path / "c.gpkg")
    assert result.exit_code == 0, result.output
    assert CRS.from_user_input(pyogrio.read_info(tmp_path / "c.gpkg")["crs"]) == CRS.from_user_input("EPSG:32633+5773")


@pytest.mark.parametrize("command", ["segment", "classify", "index"])
@pytest.mark.parametrize("origin, pixel", [
    ((500_000.0, 5_200_000.0), 5.0),   # a UTM raster labelled EPSG:4326
    ((47.0, -96.96), 0.0001),          # latitude and longitude swapped
    ((10.0, 100.0), 0.0001),           # north of the pole
], ids=["metres", "swapped", "beyond-the-pole"])
def test_a_raster_in_degrees_whose_coordinates_cannot_be_degrees_is_refused(tiny_model, tmp_path, command, origin,
                                                                           pixel):
    """It ran: the class raster was full, the polygon layer empty (or nowhere), exit 0 and no warning."""
    path = raster(tmp_path / "wrong.tif", "EPSG:4326", from_origin(*origin, pixel, pixel))
    extra = ["-c", "water", "-c", "forest", "--out", tmp_path / "o.gpkg"] if command != "index" else []
    result = run(command, path, *extra, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 2, result.output
    assert "a CRS of longitudes and latitudes" in result.output and "its CRS is probably wrong" in result.output
    assert not (tmp_path / "o.gpkg").exists()


@pytest.mark.parametrize("origin", [(-180.0, 90.0), (0.0, 90.5)], ids=["-180..180", "0..360, half a pixel over"])
def test_a_whole_world_raster_in_degrees_still_runs(tiny_model, tmp_path, origin):
    path = raster(tmp_path / "world.tif", "EPSG:4326", from_origin(*origin, 1.0, 1.0), width=360, height=180)
    result = run("segment", path, "-c", "water", "-c", "forest", "--out", tmp_path / "o.gpkg", "--model",
                 tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("bbox", [(170, -10, 190, 10), (-190, -10, -170, 10)], ids=["east past 180", "west past -180"])
def test_a_bbox_across_the_antimeridian_of_a_world_raster_classifies_only_its_two_strips(tiny_model, tmp_path, bbox):
    """The box's window spans the raster's width (its two strips lie at the west and east edges); the pixels
    between them are outside the box and get no class, so no polygon lies there."""
    path = raster(tmp_path / "world.tif", "EPSG:4326", from_origin(-180.0, 90.0, 0.5, 0.5), width=720, height=360)
    out, classes = tmp_path / "o.gpkg", tmp_path / "classes.tif"
    result = run("segment", path, "-c", "water", "-c", "forest", "--out", out, "--class-raster", classes,
                 "--bbox", *bbox, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    with rasterio.open(classes) as src:
        values = src.read(1)
        lon = src.transform.c + (np.arange(src.width) + 0.5) * src.transform.a
        lat = src.transform.f + (np.arange(src.height) + 0.5) * src.transform.e
        nodata = src.nodata
    inside = ((lon >= 170) | (lon <= -170))[None, :] & ((lat >= -10) & (lat <= 10))[:, None]
    assert (values[inside] != nodata).all() and (values[~inside] == nodata).all()
    _, _, geometries, _ = pyogrio.raw.read(out)
    west, east = 0, 0
    for geometry in shapely.from_wkb(geometries):
        xmin, ymin, xmax, ymax = geometry.bounds
        assert ymin >= -10 and ymax <= 10 and (xmin >= 170 or xmax <= -170), geometry.bounds
        west, east = west + (xmax <= -170), east + (xmin >= 170)
    assert west and east


@pytest.mark.parametrize("easting", [500_000.0, 700_000.0], ids=["at the central meridian", "east of it"])
def test_a_whole_world_bbox_in_degrees_covers_a_utm_raster(tiny_model, tmp_path, easting):
    """-180 -90 180 90 in EPSG:4326: GDAL's envelope of a box reaching both poles in UTM zone 14 came out as
    the zone's western half, so a raster at the central meridian was cut to one column and one east of it
    was said to lie outside the bbox."""
    path = raster(tmp_path / "utm.tif", "EPSG:32614", from_origin(easting, 5_200_000.0, 5.0, 5.0))
    result = run("segment", path, "-c", "water", "-c", "forest", "--out", tmp_path / "o.gpkg", "--class-raster",
                 tmp_path / "c.tif", "--bbox", -180, -90, 180, 90, "--bbox-crs", "EPSG:4326", "--model", tiny_model,
                 *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "c.tif") as classes, rasterio.open(path) as source:
        assert classes.shape == source.shape and classes.transform == source.transform
