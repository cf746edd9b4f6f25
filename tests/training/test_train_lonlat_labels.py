"""`farslip train` with labels in longitude and latitude: moved by whole turns onto a raster over 0..360 or
across the antimeridian, read in grads (EPSG:4807) where the layer says so, and latitude-first labels
refused with a sentence that says the axes look swapped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin
from training_data import COLOURS, write_labels
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()
SIZE, BLOCK = 192, 48


def scene(folder: Path, west: float, north: float, pixel: float, crs: str) -> tuple[Path, list, list[str]]:
    """A 192 x 192 raster of 4 x 4 coloured blocks at (west, north), and each block's square inset by 3 px
    in the raster's CRS with its class."""
    folder.mkdir(parents=True, exist_ok=True)
    transform = from_origin(west, north, pixel, pixel)
    names = list(COLOURS)
    rgb = np.zeros((3, SIZE, SIZE), np.uint8)
    squares, values = [], []
    for by in range(SIZE // BLOCK):
        for bx in range(SIZE // BLOCK):
            name = names[(bx + 2 * by) % 3]
            rgb[:, by * BLOCK:(by + 1) * BLOCK, bx * BLOCK:(bx + 1) * BLOCK] = np.array(COLOURS[name])[:, None, None]
            x0, y0 = transform @ (bx * BLOCK + 3, by * BLOCK + 3)
            x1, y1 = transform @ ((bx + 1) * BLOCK - 3, (by + 1) * BLOCK - 3)
            squares.append(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
            values.append(name)
    raster = folder / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs=crs,
                       transform=transform) as ds:
        ds.write(rgb)
    return raster, squares, values


def train(raster: Path, labels: Path, model: Path, out: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    return result.exit_code, result.output


def label_pixels(out: Path) -> dict[str, int]:
    return json.loads((out / "farslip_model.json").read_text())["label_pixels"]


@pytest.mark.parametrize("west", [200.0, 179.9], ids=["0-360", "antimeridian"])
def test_lonlat_labels_move_by_whole_turns_onto_the_rasters_longitudes(tmp_path, tiny_model, west):
    raster, squares, values = scene(tmp_path, west, 10.2, 0.2 / SIZE, "EPSG:4326")
    as_given = write_labels(tmp_path / "own.gpkg", squares, values, "EPSG:4326")
    # The same squares in -180..180: -159.9.. for a raster over 200..200.2; east of 180 for the other.
    wrapped = [shapely.transform(g, lambda xy: np.column_stack([(xy[:, 0] + 180) % 360 - 180, xy[:, 1]]))
               for g in squares]
    assert any(shapely.bounds(g)[0] < 0 for g in wrapped)
    moved = write_labels(tmp_path / "wrapped.gpkg", wrapped, values, "EPSG:4326")
    code, output = train(raster, as_given, tiny_model, tmp_path / "own")
    assert code == 0, output
    code, output = train(raster, moved, tiny_model, tmp_path / "wrapped")
    assert code == 0, output
    assert label_pixels(tmp_path / "wrapped") == label_pixels(tmp_path / "own")


def test_labels_in_grads_are_not_taken_for_metres(tmp_path, tiny_model):
    """EPSG:4807 counts 100 grads to the pole: a latitude of 91 grads (82 degrees) is no error."""
    raster, squares, values = scene(tmp_path, 20.0, 82.2, 0.2 / SIZE, "EPSG:4326")
    to_grads = Transformer.from_crs("EPSG:4326", "EPSG:4807", always_xy=True)
    in_grads = [shapely.transform(g, lambda xy: np.column_stack(to_grads.transform(xy[:, 0], xy[:, 1])))
                for g in squares]
    assert shapely.get_coordinates(np.array(in_grads))[:, 1].max() > 90
    code, output = train(raster, write_labels(tmp_path / "grads.gpkg", in_grads, values, "EPSG:4807"), tiny_model,
                         tmp_path / "grads")
    assert code == 0, output
    code, output = train(raster, write_labels(tmp_path / "degrees.gpkg", squares, values, "EPSG:4326"), tiny_model,
                         tmp_path / "degrees")
    assert code == 0, output
    grads, degrees = label_pixels(tmp_path / "grads"), label_pixels(tmp_path / "degrees")
    assert grads.keys() == degrees.keys()
    assert all(abs(grads[k] - degrees[k]) <= 0.01 * degrees[k] for k in degrees), (grads, degrees)


@pytest.mark.parametrize("place", [(500000.0, 3321000.0, "EPSG:32614"), (500000.0, 5000000.0, "EPSG:32633")],
                         ids=["lon-98", "lon15"])
def test_latitude_first_labels_are_refused_as_swapped(tmp_path, tiny_model, place):
    west, north, crs = place
    raster, squares, values = scene(tmp_path, west, north, 5.0, crs)
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    swapped = [shapely.transform(g, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1]))[:, ::-1])
               for g in squares]
    code, output = train(raster, write_labels(tmp_path / "swapped.gpkg", swapped, values, "EPSG:4326"), tiny_model,
                         tmp_path / "model")
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: swapped.gpkg says its polygons are in WGS 84"), lines
    assert "axes look swapped" in lines[0] and "latitude first" in lines[0], lines
    assert "GeoJSON" not in lines[0]
    assert not (tmp_path / "model").exists()
