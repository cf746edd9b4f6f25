"""classify --bbox uses the box's parts, never their envelope, as segment does: a box across the antimeridian
of a world raster is two strips at its west and east edges (not the whole width between them), and a box on a
rotated grid is the box, not its envelope in pixels."""

from __future__ import annotations


import numpy as np
import pytest
import shapely
from rasterio.transform import Affine

from cli_rasters import MODEL_ARGS, STRIPS, geometries, raster, run, world



@pytest.mark.parametrize("bbox", [(170, -10, 190, 10), (-190, -10, -170, 10)], ids=["east past 180", "west past -180"])
def test_classify_across_the_antimeridian_of_a_world_raster_writes_only_the_tiles_of_its_two_strips(
        tiny_model, tmp_path, bbox):
    """It wrote all 72 tiles of the box's rows over -180..180, 64 of them nowhere near the box."""
    out = tmp_path / "tiles.gpkg"
    result = run("classify", world(tmp_path), "-c", "water", "-c", "roof", "--tile", 20, "--bbox", *bbox,
                 "--out", out, "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    tiles = geometries(out)
    # 20-pixel (10 degree) tiles: columns -180..-170 and 170..180, rows 0..10 and -10..0.
    assert sorted(tuple(round(v, 6) for v in shapely.bounds(t)) for t in tiles) == sorted(
        (x, y, x + 10, y + 10) for x in (-180, 170) for y in (-10, 0))
    assert all(shapely.intersection(t, STRIPS).area == pytest.approx(t.area) for t in tiles)


def test_classify_on_a_rotated_raster_writes_exactly_the_tiles_with_a_pixel_centre_in_the_bbox(tiny_model, tmp_path):
    """On a grid turned 30 degrees the box's window is its envelope in pixels: two of the four tiles written
    had none of their area in the box."""
    transform = Affine.translation(500000, 5200000) @ Affine.rotation(30) @ Affine.scale(5, -5)
    path = raster(tmp_path / "rot.tif", "EPSG:32614", transform, 240, 160)
    box = (500400, 5199000, 500800, 5199400)
    out = tmp_path / "tiles.gpkg"
    result = run("classify", path, "-c", "water", "-c", "roof", "--tile", 20, "--bbox", *box, "--out", out,
                 "--model", tiny_model, *MODEL_ARGS)
    assert result.exit_code == 0, result.output
    expected = set()
    for row in range(0, 160, 20):
        for col in range(0, 240, 20):
            c, r = np.meshgrid(col + np.arange(20) + 0.5, row + np.arange(20) + 0.5)
            xs = transform.a * c + transform.b * r + transform.c
            ys = transform.d * c + transform.e * r + transform.f
            if ((xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])).any():
                expected.add(tuple(round(v, 3) for v in transform @ (col + 10, row + 10)))
    tiles = geometries(out)
    assert expected and {tuple(round(v, 3) for v in t.centroid.coords[0]) for t in tiles} == expected
    assert all(shapely.intersection(t, shapely.box(*box)).area > 0 for t in tiles)
