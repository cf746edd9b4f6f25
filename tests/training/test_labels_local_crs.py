"""evaluate/train on a raster in a local (engineering) CRS with labels in a CRS of the earth, or the other way
round, ended in a traceback ('ProjError: Error creating Transformer from CRS.', exit 1). It is one sentence,
exit 2, in the words segment --bbox-crs uses: the local CRS is not tied to the earth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RasterCRS
from rasterio.transform import Affine
from training_data import write_labels
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()
LOCAL = ('LOCAL_CS["Site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')
TRANSFORM = Affine(5, 0, 500000, 0, -5, 5200000)
WIDTH, HEIGHT = 240, 160


def raster(folder: Path, crs) -> Path:
    path = folder / "scene.tif"
    rgb = np.random.default_rng(0).integers(1, 255, (3, HEIGHT, WIDTH), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=WIDTH, height=HEIGHT, count=3, dtype="uint8", crs=crs,
                       transform=TRANSFORM) as ds:
        ds.write(rgb)
    return path


def halves(crs: str, to: str | None = None) -> list[shapely.Polygon]:
    """The raster's west and east halves (in its own coordinates, x 500000..501200, y 5199200..5200000),
    transformed from EPSG:32614 to `to` where given."""
    boxes = [shapely.box(500000, 5199200, 500600, 5200000), shapely.box(500600, 5199200, 501200, 5200000)]
    if to is None:
        return boxes
    move = Transformer.from_crs(crs, to, always_xy=True)
    return [shapely.transform(shapely.segmentize(b, 50), lambda xy: np.column_stack(move.transform(xy[:, 0], xy[:, 1])))
            for b in boxes]


def run(command: str, scene: Path, labels: Path, model: Path, out: Path, *extra) -> tuple[int, str]:
    args = ["evaluate", str(scene), str(labels), "--class-field", "cls", "--weights", str(model), "--device", "cpu",
            "-q", *map(str, extra)]
    if command == "train":
        args = ["train", str(scene), str(labels), "--class-field", "cls", "--out", str(out), "--base-model",
                str(model), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "-q",
                *map(str, extra)]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def one_sentence(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output and "ProjError" not in output
    return " ".join(output.split())


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_labels_in_degrees_on_a_raster_in_a_local_crs_are_refused_in_words(tmp_path, tiny_model, command):
    scene = raster(tmp_path, RasterCRS.from_wkt(LOCAL))
    labels = write_labels(tmp_path / "labels.gpkg", halves("EPSG:32614", "EPSG:4326"), ["field", "roof"],
                          "EPSG:4326")
    code, output = run(command, scene, labels, tiny_model, tmp_path / "model")
    assert code == 2, output
    assert one_sentence(output) == (
        "Error: The polygons of labels.gpkg cannot be placed on the raster: PROJ knows no way from their CRS WGS 84 "
        "(EPSG:4326) to the raster's CRS Site grid, a local (engineering) CRS that is not tied to the earth. Give "
        "polygons drawn in the raster's own CRS, or in one that PROJ can transform to it.")
    assert not (tmp_path / "model").exists()


def test_labels_in_a_local_crs_on_a_raster_of_the_earth_are_refused_in_words(tmp_path, tiny_model):
    scene = raster(tmp_path, "EPSG:32614")
    labels = write_labels(tmp_path / "labels.gpkg", halves("EPSG:32614"), ["field", "roof"],
                          CRS.from_wkt(LOCAL).to_wkt())
    code, output = run("evaluate", scene, labels, tiny_model, tmp_path / "model")
    assert code == 2, output
    assert "from their CRS Site grid, a local (engineering) CRS that is not tied to the earth, to the raster's CRS " \
           "WGS 84 / UTM zone 14N (EPSG:32614)." in one_sentence(output)


def test_an_area_of_interest_in_degrees_on_a_raster_in_a_local_crs_is_refused_in_words(tmp_path, tiny_model):
    scene = raster(tmp_path, RasterCRS.from_wkt(LOCAL))
    with rasterio.open(scene) as ds:  # the raster's CRS as GDAL reads it back (as QGIS gives it to new layers)
        local = ds.crs.to_wkt()
    labels = write_labels(tmp_path / "labels.gpkg", halves("EPSG:32614"), ["field", "roof"], local)
    aoi = write_labels(tmp_path / "aoi.gpkg", halves("EPSG:32614", "EPSG:4326")[:1], ["a"], "EPSG:4326")
    code, output = run("evaluate", scene, labels, tiny_model, tmp_path / "model", "--aoi", aoi)
    assert code == 2, output
    assert one_sentence(output).startswith("Error: The polygons of aoi.gpkg cannot be placed on the raster: PROJ "
                                           "knows no way from their CRS WGS 84 (EPSG:4326) to the raster's CRS "
                                           "Site grid, a local (engineering) CRS")
    # The labels in the raster's own local CRS are read as they are.
    code, output = run("evaluate", scene, labels, tiny_model, tmp_path / "model")
    assert code == 0, output


def test_labels_in_a_local_crs_of_the_same_name_defined_otherwise_are_refused_in_words(tmp_path, tiny_model):
    """A GeoTIFF keeps no local datum: labels saved with the full definition are told how to match them."""
    scene = raster(tmp_path, RasterCRS.from_wkt(LOCAL))
    labels = write_labels(tmp_path / "labels.gpkg", halves("EPSG:32614"), ["field", "roof"],
                          RasterCRS.from_wkt(LOCAL).to_wkt())
    code, output = run("evaluate", scene, labels, tiny_model, tmp_path / "model")
    assert code == 2, output
    assert one_sentence(output).startswith(
        "Error: The polygons of labels.gpkg cannot be placed on the raster: PROJ knows no way from their CRS Site "
        "grid to the raster's, a local (engineering) CRS of the same name defined otherwise")
