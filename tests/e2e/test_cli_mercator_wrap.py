"""A box or point in degrees east of 180 meets a Web Mercator raster that runs past x 20037508.34 (the same
places, a turn of x away), as it meets a raster in degrees; only cylindrical projections over the world wrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin

from cli_rasters import MODEL_ARGS, geometries, raster, run

MERCATOR_EDGE = 20037508.342789244  # x of 180 degrees east in EPSG:3857


def mercator_past_180(tmp_path: Path) -> Path:
    """EPSG:3857, 5 m pixels, x 20036908..20038108: 600 m each side of 180 degrees (x beyond 20037508.34 is
    east of it, -179.99... degrees)."""
    return raster(tmp_path / "m.tif", "EPSG:3857", from_origin(MERCATOR_EDGE - 600, -1900000, 5, 5), 240, 160)


@pytest.mark.parametrize("bbox, x_range", [
    ((-180, -16.83, -179.997, -16.82), (MERCATOR_EDGE, MERCATOR_EDGE + 333.96)),  # east of 180: was refused
    ((179.997, -16.83, 180, -16.82), (MERCATOR_EDGE - 333.96, MERCATOR_EDGE)),    # west of it, as before
], ids=["east of 180", "west of 180"])
def test_a_bbox_in_degrees_east_of_180_meets_a_web_mercator_raster_past_its_edge(tiny_model, tmp_path, bbox, x_range):
    """It said 'The bbox does not overlap the raster' (rc 2): longitudes were moved by a turn only on rasters in
    degrees."""
    path = mercator_past_180(tmp_path)
    out, classes = tmp_path / "o.gpkg", tmp_path / "classes.tif"
    result = run("segment", path, "-c", "a", "-c", "b", "--bbox", *bbox, "--bbox-crs", "EPSG:4326",
                 "--no-region-checks", "--out", out, "--class-raster", classes, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    union = shapely.union_all(geometries(out))
    xmin, _, xmax, _ = union.bounds
    assert xmin == pytest.approx(x_range[0], abs=5.01) and xmax == pytest.approx(x_range[1], abs=5.01)
    with rasterio.open(classes) as src:
        values, nodata, t = src.read(1), src.nodata, src.transform
    x = t.c + (np.arange(values.shape[1]) + 0.5) * t.a
    inside = (x >= x_range[0] - 0.01) & (x <= x_range[1] + 0.01)
    assert (values[:, ~inside] == nodata).all() and (values[:, inside] != nodata).any()


def test_an_example_point_east_of_180_is_found_on_a_web_mercator_raster_past_its_edge(tiny_model, tmp_path):
    """It said 'The point ... is outside the raster' (rc 2)."""
    path = mercator_past_180(tmp_path)
    result = run("search", path, "--like", -179.997, -16.825, "--like-crs", "EPSG:4326", "--out",
                 tmp_path / "l.gpkg", "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("crs, turn", [
    ("EPSG:3857", 40075016.686), ("EPSG:3832", 40075016.686), ("EPSG:4087", 40075016.686),
    ("+proj=merc +lon_0=150 +datum=WGS84", 40075016.686), ("EPSG:4326", 360.0),
    ("EPSG:32614", None), ("EPSG:2056", None), ("ESRI:54009", None), ("EPSG:3031", None),
    ("+proj=tmerc +lon_0=10 +k=0.9996 +datum=WGS84", None),
    ('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]', None),
])
def test_only_cylindrical_projections_over_the_world_wrap_their_x(crs, turn):
    """Web Mercator's x comes back after the equator's length; UTM's, a Swiss, polar, Mollweide (whose x at the
    antimeridian depends on the latitude) or local grid's never does."""
    from backend.engine.raster import x_turn

    found = x_turn(CRS.from_user_input(crs))
    assert (found is None) if turn is None else found == pytest.approx(turn, rel=1e-9)
