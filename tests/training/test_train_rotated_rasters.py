"""Training on rasters whose geotransform is rotated: the same pixels and labels as a north-up twin give the
same split, region boxes and crops (the samplers work in the label grid's pixels), and `farslip train`
records the true map envelopes of the split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from training_data import COLOURS, RASTER_CRS, write_labels
from typer.testing import CliRunner

from backend.engine.raster import open_source
from backend.service.cli import app
from training.api import label_grid_for
from training.batches import BatchSampler
from training.finetune import TrainingData, TrainOptions
from training.sampling import PixelBox, box_bounds, split_labels

runner = CliRunner()
SIZE, SQUARE, STEP, PIXEL = 320, 70, 80, 5.0


def rotated_twin(folder: Path, angle: float) -> tuple[Path, Path]:
    """A 320 x 320 raster of 5 m pixels whose geotransform is rotated `angle` degrees about its top-left
    corner (0: north-up), and 16 squares of 70 px labelled in three classes, rotated with it."""
    folder.mkdir(parents=True, exist_ok=True)
    transform = Affine.translation(500000, 5000000) @ Affine.rotation(-angle) @ Affine.scale(PIXEL, -PIXEL)
    names = list(COLOURS)
    rgb = np.full((3, SIZE, SIZE), 128, np.uint8)
    geometries, values = [], []
    for i in range(4):
        for j in range(4):
            name = names[(i * 4 + j) % 3]
            c0, r0 = 5 + j * STEP, 5 + i * STEP
            rgb[:, r0:r0 + SQUARE, c0:c0 + SQUARE] = np.array(COLOURS[name], np.uint8)[:, None, None]
            corners = [(c0, r0), (c0 + SQUARE, r0), (c0 + SQUARE, r0 + SQUARE), (c0, r0 + SQUARE)]
            geometries.append(shapely.Polygon([transform @ corner for corner in corners]))
            values.append(name)
    raster = folder / f"rot{angle:g}.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs=RASTER_CRS, transform=transform) as ds:
        ds.write(rgb)
    return raster, write_labels(folder / f"rot{angle:g}.gpkg", geometries, values, RASTER_CRS)


def sampled(raster: Path, labels: Path):
    """The trainer's split and BatchSampler for the raster and labels (as `farslip train` builds them)."""
    with open_source(raster, None, None, None) as source:
        grid = label_grid_for(source, labels, "cls", None, None, None)
        transform = source.window_transform(grid.window)
        split = split_labels(grid, transform, 0.2, 32)
        rgb, _ = source.read(grid.window)
        data = TrainingData(rgb, grid, split, transform, source)
        sampler = BatchSampler(data, TrainOptions(batch_size=8), 64, 224, len(grid.class_lines),
                               torch.device("cpu"))
        crops = sampler.crop_batch(np.random.default_rng(3))
        return grid, split, sampler, crops, transform


@pytest.mark.parametrize("angle", [30, 89, 90, 270])
def test_a_rotated_raster_samples_what_its_north_up_twin_samples(tmp_path, angle):
    grid0, split0, sampler0, crops0, _ = sampled(*rotated_twin(tmp_path / "north", 0))
    grid, split, sampler, crops, transform = sampled(*rotated_twin(tmp_path / "rotated", angle))
    assert grid.class_lines == grid0.class_lines
    assert (split.edge, split.train, split.train_pixels) == (split0.edge, split0.train, split0.train_pixels)
    per_class = {grid.class_lines[k]: len(v) for k, v in sampler.regions.items()}
    per_class0 = {grid0.class_lines[k]: len(v) for k, v in sampler0.regions.items()}
    assert per_class == per_class0 and len(per_class) == 3, (per_class, per_class0)
    for class_id, boxes in sampler.regions.items():
        assert np.allclose(boxes, sampler0.regions[class_id], atol=1e-6)
    # The region boxes and crops are the same pixels; crops never reach the validation strip.
    assert torch.equal(crops[0], crops0[0]) and torch.equal(crops[1], crops0[1])
    validation = shapely.box(split.validation.col0, split.validation.row0, split.validation.col1,
                             split.validation.row1)
    for boxes in sampler.regions.values():
        assert all(shapely.box(*b).distance(validation) >= 32 - 1e-6 for b in boxes)
    # The recorded bounds are the map envelopes of the pixel boxes (all four corners).
    train = split.train
    corners = shapely.MultiPoint([transform @ (c, r) for c in (train.col0, train.col1)
                                  for r in (train.row0, train.row1)])
    assert split.train_bounds == pytest.approx(corners.bounds)


@pytest.mark.parametrize("angle", [30, 90])
def test_farslip_train_on_a_rotated_raster_records_the_true_split_bounds(tmp_path, tiny_model, angle):
    raster, labels = rotated_twin(tmp_path / "data", angle)
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    meta = json.loads((out / "farslip_model.json").read_text())
    split = meta["split"]
    train = PixelBox(**split["train"])
    with rasterio.open(raster) as ds:
        window = meta["label_window"]
        transform = ds.transform @ Affine.translation(window["col_off"], window["row_off"])
    xmin, ymin, xmax, ymax = split["train_bounds"]
    assert (xmin, ymin, xmax, ymax) == pytest.approx(box_bounds(train, transform))
    # A 30-degree envelope of a w x h pixel box is w cos + h sin wide (it was a 159 m strip).
    theta = math.radians(angle)
    width = PIXEL * (train.width * abs(math.cos(theta)) + train.height * abs(math.sin(theta)))
    assert xmax - xmin == pytest.approx(width)
