"""area_m2 of polygons in degrees (and in Web Mercator) is the ground area of their pixels.

The reference is the closed form of the area of a latitude-longitude rectangle on the ellipsoid (the
authalic-latitude formula), not pyproj's Geod that the engine uses: the edges of a pixel in degrees are
parallels and meridians, and Geod alone would join the corners by geodesics."""

from __future__ import annotations

import math

import numpy as np
import pyogrio
import pyproj
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.engine.vectorize import polygon_areas_m2
from backend.service.cli import app

WGS84 = pyproj.CRS("EPSG:4326")


def rectangle_m2(west: float, south: float, east: float, north: float) -> float:
    """Exact area of a longitude-latitude rectangle on the WGS 84 ellipsoid."""
    ellipsoid = WGS84.ellipsoid
    a, inverse_f = ellipsoid.semi_major_metre, ellipsoid.inverse_flattening
    e2 = (2 - 1 / inverse_f) / inverse_f
    e = math.sqrt(e2)

    def q(latitude: float) -> float:
        s = math.sin(math.radians(latitude))
        return s / (1 - e2 * s * s) - math.log((1 - e * s) / (1 + e * s)) / (2 * e)

    return a * a * (1 - e2) / 2 * math.radians(east - west) * (q(north) - q(south))


@pytest.mark.parametrize("box", [(0, 50, 40, 70), (-180, -90, 180, 90), (-180, 80, 180, 90), (10, -5, 10.5, 5),
                                 (100, -60, 170, -10)])
def test_a_rectangle_in_degrees_has_its_ground_area(box):
    area = polygon_areas_m2([shapely.box(*box)], WGS84)[0]
    assert area == pytest.approx(rectangle_m2(*box), rel=1e-4)


def test_an_edge_a_hair_past_the_pole_counts_as_the_pole():
    """gdalwarp writes a world grid's top edge as 90.00000000000001: the polygon keeps its area."""
    past = polygon_areas_m2([shapely.box(10, 80, 20, 90.00000000000001)], WGS84)[0]
    assert past == pytest.approx(rectangle_m2(10, 80, 20, 90), rel=1e-4)


@pytest.mark.parametrize("box", [(0, 50, 40, 70), (178.5, 53, 181.5, 58)])  # the second across the antimeridian
def test_a_large_polygon_in_web_mercator_has_its_ground_area(box):
    """A box in Web Mercator is a longitude-latitude rectangle on the ground."""
    west, south, east, north = box
    to_mercator = pyproj.Transformer.from_crs(WGS84, "EPSG:3857", always_xy=True)
    _, (y0, y1) = to_mercator.transform([0, 0], [south, north])
    x0, x1 = (lon * 20_037_508.342789244 / 180 for lon in (west, east))  # past 180: x past the map's edge
    area = polygon_areas_m2([shapely.box(x0, y0, x1, y1)], pyproj.CRS("EPSG:3857"))[0]
    assert area == pytest.approx(rectangle_m2(*box), rel=1e-4)


def _ground_by_cells(box, crs: str, cells: int = 200) -> float:
    """Reference area of a projected box: small cells' planar areas divided by the projection's areal scale
    at their centres (pyproj's factors, independent of the engine's integration)."""
    x0, y0, x1, y1 = box
    xs = x0 + (np.arange(cells) + 0.5) * (x1 - x0) / cells
    ys = y0 + (np.arange(cells) + 0.5) * (y1 - y0) / cells
    gx, gy = np.meshgrid(xs, ys)
    projection = pyproj.Proj(crs)
    lon, lat = projection(gx.ravel(), gy.ravel(), inverse=True)
    scale = np.asarray(projection.get_factors(lon, lat).areal_scale)
    return float(np.sum((x1 - x0) * (y1 - y0) / cells**2 / scale))


@pytest.mark.parametrize("box, crs", [
    ((-500_000, -500_000, 500_000, 500_000), "EPSG:3413"),  # around the north pole
    ((-800_000, -300_000, 200_000, 700_000), "EPSG:3031"),  # around the south pole, off centre
    ((200_000, 200_000, 900_000, 900_000), "EPSG:3413"),  # beside it
])
def test_a_projected_polygon_around_a_pole_has_its_ground_area(box, crs):
    area = polygon_areas_m2([shapely.box(*box)], pyproj.CRS(crs))[0]
    assert area == pytest.approx(_ground_by_cells(box, crs), rel=1e-3)


def test_segment_of_a_grid_reaching_past_the_pole_keeps_every_region(tiny_model, tmp_path):
    """A 0.05 degree grid whose top edge is 90 plus float noise: every region of the class raster is a
    polygon (none dropped for a NaN area), and each class's area is its pixels' ground area."""
    height, width = 200, 400
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), ((x // 17 + y // 13) % 2) * 200]).astype("uint8")
    raster = tmp_path / "polar.tif"
    transform = Affine(0.05, 0, 0.0, 0, -0.05, 90.00000000000001)
    with rasterio.open(raster, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=transform) as dst:
        dst.write(rgb)
    out, classes = tmp_path / "polar.gpkg", tmp_path / "classes.tif"
    result = CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "forest", "-c", "bare soil",
                                      "--model", str(tiny_model), "--out", str(out), "--class-raster", str(classes),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    with rasterio.open(classes) as src:
        values = src.read(1)
        regions = [(shapely.geometry.shape(geometry), int(value)) for geometry, value in
                   rasterio.features.shapes(values, transform=src.transform) if value != src.nodata]
    meta, _, _, fields = pyogrio.raw.read(out)
    frame = {name: np.asarray(fields[i]) for i, name in enumerate(meta["fields"])}
    assert len(frame["area_m2"]) == len(regions)
    assert np.isfinite(frame["area_m2"]).all()
    rows = np.arange(height)
    north = 90 - rows * 0.05
    row_area = np.array([rectangle_m2(0, max(n - 0.05, -90), 0.05, min(n, 90)) for n in north])
    for class_id in sorted({value for _, value in regions}):
        expected = float((row_area[:, None] * (values == class_id)).sum())
        assert frame["area_m2"][frame["class_id"] == class_id].sum() == pytest.approx(expected, rel=1e-4)
