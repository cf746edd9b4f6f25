"""`farslip train TILE1 TILE2 ... LABELS` (DESIGN.md: a training job takes "raster(s)"): the tiles of one survey,
on one pixel grid, are trained on as one mosaic (a VRT kept in the state folder, which the model records and an
evaluation finds again); tiles that are not on one grid are refused in a sentence saying how to align them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.engine.mosaic import mosaic_of
from backend.engine.raster import PixelWindow, open_source
from backend.service.cli import app

runner = CliRunner()


def tile(raster, path, window: Window, **changes) -> str:
    """A part of `raster` as a file of its own (its pixels, placed where they lie), with profile `changes`."""
    with rasterio.open(raster) as ds:
        profile = ds.profile | {"width": window.width, "height": window.height,
                                "transform": ds.window_transform(window)} | changes
        pixels = ds.read(window=window)
    with rasterio.open(path, "w", **profile) as out:
        out.write(pixels)
    return str(path)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_tiles_on_one_grid_read_as_the_raster_they_were_cut_from_with_the_gap_masked(synthetic, tmp_path, home):
    raster, _, _ = synthetic
    left = tile(raster, tmp_path / "left.tif", Window(0, 0, 180, 384))
    right = tile(raster, tmp_path / "right.tif", Window(200, 40, 184, 344))  # a gap, and a corner missing
    mosaic = mosaic_of([left, right])
    assert mosaic.startswith(str(home / "mosaics")) and mosaic_of([left, right]) == mosaic  # kept: the same file
    with rasterio.open(raster) as ds:
        whole = ds.read()
    with open_source(mosaic) as source:
        assert (source.height, source.width) == (384, 384)
        rgb, valid = source.read(PixelWindow(0, 0, 384, 384))
    expected = np.zeros((384, 384), bool)
    expected[:, :180] = True
    expected[40:, 200:] = True
    assert (valid == expected).all()
    assert (rgb[:, valid] == whole[:, valid].astype(np.float32)).all()


def test_training_on_two_tiles_records_their_mosaic_and_evaluates_on_it(synthetic, tiny_model, tmp_path, home):
    raster, labels, _ = synthetic
    left = tile(raster, tmp_path / "left.tif", Window(0, 0, 192, 384))
    right = tile(raster, tmp_path / "right.tif", Window(192, 0, 192, 384))
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", left, right, str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "farslip_model.json").read_text("utf-8"))
    assert recorded["data"]["raster"]["path"] == mosaic_of([left, right])
    mosaic = mosaic_of([left, right])
    assert f"The {2} rasters are trained on as one mosaic: {mosaic}" in result.output
    evaluated = runner.invoke(app, ["evaluate", mosaic, str(labels), "--class-field", "cls", "--model", str(out),
                                    "--split", "validation", "--device", "cpu", "-q",
                                    "--json", str(tmp_path / "evaluation.json")])
    assert evaluated.exit_code == 0, evaluated.output  # its held-out strip: the model knows the mosaic
    report = json.loads((tmp_path / "evaluation.json").read_text("utf-8"))
    assert report["raster"] == mosaic and report["split"] == "validation"


@pytest.mark.parametrize("changes, words", [
    ({"crs": "EPSG:32634"}, "are in different CRSs"),
    ({"transform": rasterio.transform.from_origin(500384, 5000000, 4.0, 4.0)}, "have different pixel sizes"),
    ({"transform": rasterio.transform.from_origin(500384.5, 5000000, 2.0, 2.0)}, "are not on one pixel grid"),
    ({"count": 1}, "differ in bands"),
])
def test_tiles_not_on_one_grid_are_refused_before_anything_is_written(synthetic, tiny_model, tmp_path, home,
                                                                      changes, words):
    raster, labels, _ = synthetic
    left = tile(raster, tmp_path / "left.tif", Window(0, 0, 192, 384))
    if changes.get("count") == 1:
        with rasterio.open(left) as ds:
            profile, band = ds.profile | {"count": 1}, ds.read(1)
        with rasterio.open(tmp_path / "right.tif", "w", **profile) as out:
            out.write(band, 1)
        right = str(tmp_path / "right.tif")
    else:
        right = tile(raster, tmp_path / "right.tif", Window(192, 0, 192, 384), **changes)
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", left, right, str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(tiny_model), "--epochs", "1", "--device", "cpu", "-q"])
    assert result.exit_code == 2, result.output
    assert f"The rasters {right} and {left} {words}" in result.output
    assert not out.exists() and not (home / "mosaics").exists()


def test_where_tiles_overlap_a_tiles_nodata_leaves_the_other_tiles_pixels(synthetic, tmp_path, home):
    """Overlapping tiles (NAIP's quarter quads overlap): the right tile's nodata over the overlap masked the
    left tile's valid pixels there, and its hidden values replaced theirs."""
    raster, _, _ = synthetic
    left = tile(raster, tmp_path / "left.tif", Window(0, 0, 250, 384))
    right = tile(raster, tmp_path / "right.tif", Window(150, 0, 234, 384), nodata=0)
    with rasterio.open(right, "r+") as ds:
        pixels = np.maximum(ds.read(), 1)  # its own data never the nodata value
        pixels[:, :, :60] = 0  # nodata over most of the overlap (its columns 150..210)
        ds.write(pixels)
    with rasterio.open(raster) as ds:
        whole = ds.read()
    with open_source(mosaic_of([left, right])) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 384, 384))
    assert valid.all()
    assert (rgb[:, :, :210] == whole[:, :, :210].astype(np.float32)).all()  # the left tile's, under the nodata
    assert (rgb[:, :, 210:] == np.maximum(whole[:, :, 210:], 1)).all()  # the right tile's, where it holds data


def test_the_labels_forgotten_is_said_as_the_labels_missing(synthetic):
    raster, _, _ = synthetic
    result = runner.invoke(app, ["train", str(raster), "--class-field", "cls"])
    assert result.exit_code == 2
    assert "Missing argument 'RASTER... LABELS': give the raster(s) to train on, then the labels file." in \
        result.output


def test_a_mosaic_in_a_latitude_first_crs_lies_where_its_tiles_do_for_gdal_and_qgis(tmp_path, home):
    """EPSG:4326's axes are latitude, longitude: the VRT said x, y were its axes 1, 2, and GDAL (QGIS) put the
    mosaic at 99 deg S, 47 deg E for tiles in North Dakota."""
    import subprocess

    tiles = []
    for number, west in enumerate((-99.02, -99.01)):
        path = tmp_path / f"g{number}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8",
                           crs="EPSG:4326", transform=rasterio.transform.from_origin(west, 47.05, 5e-5, 5e-5)) as ds:
            ds.write(np.full((3, 100, 200), 100, np.uint8))
        tiles.append(str(path))
    mosaic = mosaic_of(tiles)
    script = ("import sys; from osgeo import gdal, osr; ds = gdal.Open(sys.argv[1]); x0, a, _, y0, _, e = "
              "ds.GetGeoTransform(); wgs = osr.SpatialReference(); wgs.ImportFromEPSG(4326); "
              "wgs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER); "
              "t = osr.CoordinateTransformation(ds.GetSpatialRef(), wgs); print(*t.TransformPoint(x0, y0)[:2])")
    done = subprocess.run([str(Path("/usr/bin/python3")), "-c", script, mosaic], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lon, lat = map(float, done.stdout.split())
    assert abs(lon + 99.02) < 1e-9 and abs(lat - 47.05) < 1e-9


def test_tiles_named_relatively_in_gdals_syntax_are_kept_absolute(synthetic, tmp_path, home, monkeypatch):
    """A relative /vsizip/ name went into the kept VRT as typed: the mosaic read other files (or none) from
    any other folder."""
    import zipfile

    raster, _, _ = synthetic
    left = tile(raster, tmp_path / "left.tif", Window(0, 0, 192, 384))
    right = tile(raster, tmp_path / "right.tif", Window(192, 0, 192, 384))
    with zipfile.ZipFile(tmp_path / "tiles.zip", "w") as archive:
        archive.write(left, "left.tif")
        archive.write(right, "right.tif")
    monkeypatch.chdir(tmp_path)
    mosaic = mosaic_of(["/vsizip/tiles.zip/left.tif", "/vsizip/tiles.zip/right.tif"])
    assert f"/vsizip/{tmp_path / 'tiles.zip'}/left.tif" in Path(mosaic).read_text("utf-8")
    monkeypatch.chdir(home.parent)
    with open_source(mosaic) as source:
        rgb, valid = source.read(PixelWindow(0, 0, 384, 384))
    with rasterio.open(raster) as ds:
        assert valid.all() and (rgb == ds.read().astype(np.float32)).all()
    with pytest.raises(InputError, match="is given twice"):  # one file, named through a link too
        (tmp_path / "link.tif").symlink_to(left)
        mosaic_of([left, str(tmp_path / "link.tif")])
