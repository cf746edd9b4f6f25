"""Label and --aoi polygons in a projected CRS that cross the antimeridian, on a raster in degrees across it:
PROJ gave each vertex a longitude in -180..180, so a polygon across 180 came out as a sliver around the world
('cover only one class'), a GEOS TopologyException (a traceback), or an --aoi that 'does not overlap the
raster' while quoting the raster's own extent. Each ring's longitudes now run on without a jump, and each
polygon (each part of a multipolygon split at 180) is moved by whole turns onto the raster's longitudes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()
WIDTH, HEIGHT = 240, 160
PIXEL = 5 / 111320  # about 5 m of longitude; the raster spans 179.9946..180.0054
TRANSFORM = Affine(PIXEL, 0, 180 - 120 * PIXEL, 0, -PIXEL, -17.0)


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("antimeridian") / "anti.tif"
    rgb = np.random.default_rng(0).integers(1, 255, (3, HEIGHT, WIDTH), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=TRANSFORM) as ds:
        ds.write(rgb)
    return path


def columns(c0: float, c1: float, crs: str, transform: Affine = TRANSFORM,
            raster_crs: str = "EPSG:4326") -> shapely.Polygon:
    """The raster's columns c0..c1 (all rows) as a polygon in `crs`, 50 points a side (longitudes past 180
    transformed as PROJ does: into -180..180)."""
    along, down = np.linspace(c0, c1, 50), np.linspace(0, HEIGHT, 50)
    ring = ([transform @ (c, 0) for c in along] + [transform @ (c1, r) for r in down]
            + [transform @ (c, HEIGHT) for c in along[::-1]] + [transform @ (c0, r) for r in down[::-1]])
    to = Transformer.from_crs(raster_crs, crs, always_xy=True)
    return shapely.transform(shapely.Polygon(ring), lambda xy: np.column_stack(to.transform(xy[:, 0], xy[:, 1])))


def write(path: Path, geometries: list, values: list, crs: str) -> Path:
    pyogrio.raw.write(path, shapely.to_wkb(np.array(geometries, dtype=object)), [np.array(values, dtype=object)],
                      ["cls"], driver="GPKG", geometry_type="Unknown", crs=CRS(crs).to_wkt())
    return path


def evaluate(raster: Path, labels: Path, model: Path, out: Path, *extra) -> dict[str, int]:
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--weights",
                                 str(model), "--device", "cpu", "-q", "--json", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output
    return {c["class"]: c["pixels"] for c in json.loads(out.read_text())["metrics"]["classes"]}


@pytest.mark.parametrize("crs", ["EPSG:32701", "EPSG:3832"], ids=["utm-1-south", "pdc-mercator"])
def test_label_polygons_across_the_antimeridian_keep_their_pixels(raster, tiny_model, tmp_path, crs):
    # field: columns 0..100 (west of 180); roof: 100..240, across 180 (the raster's middle column is 120).
    labels = write(tmp_path / "labels.gpkg", [columns(0, 100, crs), columns(100, 240, crs)], ["field", "roof"], crs)
    xs = shapely.get_coordinates(shapely.transform(
        columns(100, 240, crs), lambda xy: np.column_stack(
            Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xy[:, 0], xy[:, 1]))))[:, 0]
    assert xs.min() < 0 < xs.max()  # vertex by vertex, the roof's longitudes jump from 180 to -180
    assert evaluate(raster, labels, tiny_model, tmp_path / "m.json") == {"field": 100 * HEIGHT, "roof": 140 * HEIGHT}


def test_an_area_of_interest_across_the_antimeridian_holds_the_labels(raster, tiny_model, tmp_path):
    crs = "EPSG:3832"
    labels = write(tmp_path / "labels.gpkg", [columns(0, 110, crs), columns(130, 240, crs)], ["field", "roof"], crs)
    aoi = write(tmp_path / "aoi.gpkg", [columns(0, 240, crs)], ["all"], crs)
    pixels = evaluate(raster, labels, tiny_model, tmp_path / "m.json", "--aoi", aoi)
    assert pixels == {"field": 110 * HEIGHT, "roof": 110 * HEIGHT}
    # An area of interest over columns 60..180 only, across 180: the labelled pixels inside it.
    aoi = write(tmp_path / "middle.gpkg", [columns(60, 180, crs)], ["middle"], crs)
    assert evaluate(raster, labels, tiny_model, tmp_path / "m2.json", "--aoi", aoi) == {"field": 50 * HEIGHT,
                                                                                           "roof": 50 * HEIGHT}


def test_a_lonlat_multipolygon_split_at_the_antimeridian_keeps_both_parts(raster, tiny_model, tmp_path):
    """A polygon across 180 saved as two parts, one at each end of -180..180 (as GeoJSON files are): the part
    at -180 is moved a turn east onto the raster, not left off it with the whole polygon kept where it was."""
    west = shapely.box(*(TRANSFORM @ (100, HEIGHT)), 180.0, TRANSFORM.f)
    east = shapely.box(-180.0, (TRANSFORM @ (0, HEIGHT))[1], (TRANSFORM @ (240, 0))[0] - 360, TRANSFORM.f)
    field = shapely.box(*(TRANSFORM @ (0, HEIGHT)), *(TRANSFORM @ (100, 0)))
    labels = write(tmp_path / "split.gpkg", [field, shapely.MultiPolygon([west, east])], ["field", "roof"],
                   "EPSG:4326")
    assert evaluate(raster, labels, tiny_model, tmp_path / "m.json") == {"field": 100 * HEIGHT, "roof": 140 * HEIGHT}


def test_training_on_labels_across_the_antimeridian(raster, tiny_model, tmp_path):
    crs = "EPSG:32701"
    labels = write(tmp_path / "labels.gpkg", [columns(0, 100, crs), columns(100, 240, crs)], ["field", "roof"], crs)
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "farslip_model.json").read_text())["label_pixels"] == {"field": 100 * HEIGHT,
                                                                                    "roof": 140 * HEIGHT}


def test_on_a_world_raster_a_polygon_across_the_antimeridian_lies_at_both_edges(tiny_model, tmp_path):
    """A world raster (-180..180) reaches the antimeridian from both sides: a polygon over 170..190 degrees
    east is labelled at its east edge (170..180) and at its west edge (-180..-170), not half of it."""
    world = tmp_path / "world.tif"
    with rasterio.open(world, "w", driver="GTiff", width=720, height=360, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=Affine(0.5, 0, -180, 0, -0.5, 90)) as ds:
        ds.write(np.random.default_rng(1).integers(1, 255, (3, 360, 720), dtype=np.uint8))
    to = Transformer.from_crs("EPSG:4326", "EPSG:3832", always_xy=True)

    def box(west: float, east: float) -> shapely.Polygon:  # lon/lat edges, 10 S..10 N, straight in Mercator
        (x0, x1), (y0, y1) = to.transform([west, east], [-10, 10])  # 190 east: x 4452779.63 (central meridian 150)
        return shapely.box(x0, y0, x1, y1)

    labels = write(tmp_path / "labels.gpkg", [box(100, 120), box(170, 190)], ["field", "roof"], "EPSG:3832")
    assert evaluate(world, labels, tiny_model, tmp_path / "m.json") == {"field": 40 * 40, "roof": 40 * 40}


def test_on_a_web_mercator_raster_across_the_antimeridian_labels_keep_their_pixels(tiny_model, tmp_path):
    """An EPSG:3857 raster that runs past x 20037508.34 (180 degrees east): its x comes back after a turn, so
    labels across 180 (in UTM 1 south) and a part east of 180 (in degrees, at -179.99) are placed as there."""
    edge = 20037508.342789244
    transform = Affine(5, 0, edge - 600, 0, -5, -1900000)
    mercator = tmp_path / "mercator.tif"
    with rasterio.open(mercator, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=3, dtype="uint8",
                       crs="EPSG:3857", transform=transform) as ds:
        ds.write(np.random.default_rng(2).integers(1, 255, (3, HEIGHT, WIDTH), dtype=np.uint8))
    crs = "EPSG:32701"
    labels = write(tmp_path / "utm.gpkg", [columns(0, 100, crs, transform, "EPSG:3857"),
                                           columns(100, 240, crs, transform, "EPSG:3857")], ["field", "roof"], crs)
    assert evaluate(mercator, labels, tiny_model, tmp_path / "m.json") == {"field": 100 * HEIGHT, "roof": 140 * HEIGHT}
    # In degrees: the field west of 180, the roof east of it (-179.99..), each whole.
    labels = write(tmp_path / "lonlat.gpkg", [columns(0, 100, "EPSG:4326", transform, "EPSG:3857"),
                                              columns(130, 240, "EPSG:4326", transform, "EPSG:3857")],
                   ["field", "roof"], "EPSG:4326")
    assert shapely.bounds(columns(130, 240, "EPSG:4326", transform, "EPSG:3857"))[2] < -179.99
    assert evaluate(mercator, labels, tiny_model, tmp_path / "m2.json") == {"field": 100 * HEIGHT,
                                                                            "roof": 110 * HEIGHT}
