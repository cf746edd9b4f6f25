"""Scaled runs over rasters on unusual grids (south-up, rotated) and rasters that share a file name: the class
VRT puts every pixel where its raster has it, the report's pixel sizes are the pixels' sides, and every polygon
names the raster it came from as its class raster is named. Tiny rasters, one worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.scale.merge import write_raster_vrt
from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CRS = "EPSG:32632"
CLASSES = ["-c", "water", "-c", "tree"]
NORTH_UP_2M = Affine(2, 0, 500000, 0, -2, 5000000)
SOUTH_UP_2M = Affine(2, 0, 500000, 0, 2, 5000000)
SOUTH_UP_1M = Affine(1, 0, 500128, 0, 1, 5000000)  # east of SOUTH_UP_2M's 64 x 64 pixels
ROTATED_2M = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(2, -2)


def write_image(path: Path, transform: Affine, seed: int, size: int = 64) -> Path:
    """A small RGB image with a few flat patches (so it has polygons of more than one class)."""
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 255, (3, 4, 4), dtype=np.uint8)
    pixels = np.kron(patches, np.ones((size // 4, size // 4), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=CRS,
                       transform=transform) as ds:
        ds.write(pixels)
    return path


def write_classes(path: Path, transform: Affine, values: np.ndarray) -> Path:
    """A class GeoTIFF as a run writes one: uint8, 255 nodata, a colour table."""
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype="uint8", crs=CRS, transform=transform, nodata=255) as ds:
        ds.write(values, 1)
        ds.write_colormap(1, {0: (0, 0, 255, 255), 1: (0, 128, 0, 255)})
    return path


def assert_vrt_holds_every_part(vrt: Path, parts: list[Path]) -> None:
    """Every pixel centre of every part, sampled through the VRT, has the part's value."""
    with rasterio.open(vrt) as mosaic:
        for part in parts:
            with rasterio.open(part) as ds:
                values = ds.read(1)
                rows, cols = np.mgrid[0:ds.height, 0:ds.width]
                xs, ys = rasterio.transform.xy(ds.transform, rows.ravel(), cols.ravel())
                sampled = np.array([v[0] for v in mosaic.sample(zip(xs, ys))])
            assert np.array_equal(sampled, values.ravel()), part.name


@pytest.mark.parametrize("first, second", [(NORTH_UP_2M, Affine(1, 0, 500128, 0, -1, 5000000)),
                                           (SOUTH_UP_2M, SOUTH_UP_1M)])
def test_a_class_vrt_over_north_up_or_south_up_rasters_of_two_pixel_sizes_puts_every_pixel_in_place(
        tmp_path, first, second):
    rng = np.random.default_rng(0)
    parts = [write_classes(tmp_path / "a.tif", first, rng.integers(0, 2, (40, 64), dtype=np.uint8)),
             write_classes(tmp_path / "b.tif", second, rng.integers(0, 2, (50, 30), dtype=np.uint8))]
    write_raster_vrt(tmp_path / "classes.vrt", parts, rasterio.crs.CRS.from_string(CRS))
    with rasterio.open(tmp_path / "classes.vrt") as mosaic:
        assert mosaic.res == (1.0, 1.0)  # the finer of the two
        assert (mosaic.transform.e > 0) == (first.e > 0)  # south-up parts, a south-up mosaic
    assert_vrt_holds_every_part(tmp_path / "classes.vrt", parts)


def test_a_class_vrt_names_the_classes_of_its_rasters(tmp_path, gdal_category_names):
    rng = np.random.default_rng(1)
    parts = [write_classes(tmp_path / "a.tif", NORTH_UP_2M, rng.integers(0, 2, (40, 64), dtype=np.uint8))]
    with rasterio.open(parts[0], "r+") as ds:
        ds.update_tags(1, CLASS_0="water & sand", CLASS_1="<roof>", UNCLASSIFIED="254")
    write_raster_vrt(tmp_path / "classes.vrt", parts, rasterio.crs.CRS.from_string(CRS))
    names = gdal_category_names(tmp_path / "classes.vrt")
    assert names[:3] == ["water & sand", "<roof>", ""] and names[254] == "unclassified"


def run_segment(inputs, out: Path, model: Path, *extra):
    return CliRunner().invoke(app, ["segment", *map(str, inputs), *CLASSES, "--model", str(model), "--out", str(out),
                                    "--workers", "1", "--quiet", *map(str, extra)])


def read_layer(path: Path):
    meta, _, wkb, values = pyogrio.raw.read(path)
    return shapely.from_wkb(wkb), dict(zip(meta["fields"], values))


def test_two_rasters_of_one_file_name_are_told_apart_by_folder_and_the_south_up_class_vrt_is_right(
        local_ray, tiny_model, tmp_path):
    """The `raster` field of west/t.tif and east/t.tif is each one's path below their common folder, and its
    class GeoTIFF has that path in the VRT's folder; the south-up rasters' pixel sizes are positive."""
    first = write_image(tmp_path / "in" / "west" / "t.tif", SOUTH_UP_2M, seed=1)
    second = write_image(tmp_path / "in" / "east" / "t.tif", SOUTH_UP_1M, seed=2)
    out = tmp_path / "out" / "all.gpkg"
    out.parent.mkdir()
    result = run_segment([first, second], out, tiny_model, "--class-raster", out.with_name("classes.vrt"))
    assert result.exit_code == 0, result.output

    shapes, fields = read_layer(out)
    assert set(fields["raster"]) == {"east/t.tif", "west/t.tif"}
    folder = out.with_name("classes_rasters")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tif")) == ["east/t.tif", "west/t.tif"]
    for shape, class_id, raster in zip(shapes, fields["class_id"], fields["raster"]):
        with rasterio.open(folder / raster) as ds:
            x, y = shapely.get_coordinates(shape.representative_point())[0]
            row, col = ds.index(x, y)
            assert 0 <= row < ds.height and 0 <= col < ds.width, f"a polygon of {raster} lies outside it"
            assert next(ds.sample([(x, y)]))[0] == class_id
    assert_vrt_holds_every_part(out.with_name("classes.vrt"), [folder / "west" / "t.tif", folder / "east" / "t.tif"])

    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [r["pixel_size"] for r in report["rasters"]] == [[2.0, 2.0], [1.0, 1.0]]


def test_a_rotated_raster_reports_the_side_of_its_pixels(local_ray, tiny_model, tmp_path):
    raster = write_image(tmp_path / "rotated.tif", ROTATED_2M, seed=3)
    out = tmp_path / "rotated.gpkg"
    result = run_segment([raster], out, tiny_model)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["rasters"][0]["pixel_size"] == pytest.approx([2.0, 2.0])


def test_a_bbox_on_a_rotated_raster_gives_the_polygons_segment_gives_inside_the_box(local_ray, tiny_model, tmp_path):
    """On a rotated grid the pixel window of a box reaches far beyond it; the workers leave the pixels outside
    the box without a class, as `segment` does, so both give the same polygons, all inside the box."""
    raster = write_image(tmp_path / "rotated.tif", ROTATED_2M, seed=3)
    cx, cy = ROTATED_2M @ (32, 32)
    bbox = [cx - 30, cy - 20, cx + 30, cy + 20]
    scaled, plain = tmp_path / "scaled.gpkg", tmp_path / "plain.gpkg"
    result = run_segment([raster], scaled, tiny_model, "--bbox", *bbox)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["segment", str(raster), *CLASSES, "--model", str(tiny_model), "--out",
                                      str(plain), "--quiet", "--bbox", *map(str, bbox)])
    assert result.exit_code == 0, result.output
    scaled_union = shapely.union_all(read_layer(scaled)[0])
    plain_union = shapely.union_all(read_layer(plain)[0])
    assert scaled_union.area > 0 and scaled_union.symmetric_difference(plain_union).area < 1e-6
    assert scaled_union.difference(shapely.box(*bbox).buffer(2 ** 0.5 + 1e-6)).area == 0


def test_a_run_where_every_raster_fails_leaves_no_partial_folder_in_the_next_runs_way(
        local_ray, shared_data, tiny_model, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("all-nodata.tif", "corrupt.tif"):
        (folder / name).symlink_to(shared_data / name)
    out = tmp_path / "bad.gpkg"
    result = run_segment([folder], out, tiny_model)
    assert result.exit_code == 4, result.output
    assert "all-nodata.tif" in result.output and "corrupt.tif" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no bad.gpkg.partial


def test_the_tests_ray_workers_keep_their_caches_where_the_tests_do(local_ray):
    """Workers started with the module's Ray read and wrote the user's own cache (~/.cache/farslip)."""
    @ray.remote
    def folders() -> tuple[str | None, str | None]:
        return os.environ.get("FARSLIP_CACHE"), os.environ.get("FARSLIP_HOME")

    assert ray.get(folders.remote()) == (os.environ["FARSLIP_CACHE"], os.environ["FARSLIP_HOME"])
