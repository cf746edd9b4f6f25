"""Region-category alignment (FARSLIP_METHOD.md section 6, stage 2): its boxes obey the sqrt(area) rule of
64-1024 native pixels, filler boxes go only to classes without a polygon box, and a run where it cannot run
(region boxes of fewer than two classes) says so in one warning and records it in farslip_model.json."""

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
from training_data import RASTER_CRS, write_labels
from typer.testing import CliRunner

from backend.engine.raster import open_source
from backend.service.cli import app
from training.api import label_grid_for
from training.batches import BatchSampler
from training.finetune import TrainingData, TrainOptions
from training.sampling import split_labels

runner = CliRunner()
ROOF, POND, GROUND = (200, 60, 60), (40, 70, 160), (110, 140, 90)


def scene(folder: Path, pond: bool, size: int = 320) -> tuple[Path, Path]:
    """A `size`-pixel raster of 1 m pixels: 16 x 16 m roofs every 64 m on ground (their sqrt(area) is 16 native
    pixels, far below 64) and, with `pond`, one 100 x 100 m pond in the middle (a region box of 100 native
    pixels, away from any validation strip)."""
    folder.mkdir(parents=True, exist_ok=True)
    transform = Affine.translation(500000, 5000000) @ Affine.scale(1.0, -1.0)
    rgb = np.empty((3, size, size), np.uint8)
    rgb[:] = np.array(GROUND, np.uint8)[:, None, None]
    boxes, values = [], []
    for row in range(8, size, 64):
        for col in range(8, size, 64):
            if pond and 90 < row < 215 and 90 < col < 215:
                continue
            boxes.append((col, row, col + 16, row + 16))
            values.append("roof")
    if pond:
        boxes.append((110, 110, 210, 210))
        values.append("pond")
    for (c0, r0, c1, r1), value in zip(boxes, values):
        rgb[:, r0:r1, c0:c1] = np.array(ROOF if value == "roof" else POND, np.uint8)[:, None, None]
    raster = folder / "scene.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs=RASTER_CRS, transform=transform) as ds:
        ds.write(rgb)
    geometries = [shapely.Polygon([transform @ corner for corner in ((c0, r0), (c1, r0), (c1, r1), (c0, r1))])
                  for c0, r0, c1, r1 in boxes]
    return raster, write_labels(folder / "labels.gpkg", geometries, values, RASTER_CRS)


def sampler_for(raster: Path, labels: Path, options: TrainOptions, crop_px: int, scale: float | None = None):
    with open_source(raster, None, scale, None) as source:
        grid = label_grid_for(source, labels, "cls", "ground", None, None)
        transform = source.window_transform(grid.window)
        split = split_labels(grid, transform, options.validation_fraction, options.buffer_px)
        rgb, _ = source.read(grid.window)
        data = TrainingData(rgb, grid, split, transform, source)
        return grid, BatchSampler(data, options, crop_px, 224, len(grid.class_lines), torch.device("cpu"))


def native_sides(boxes, native_per_pixel: float) -> list[float]:
    return [math.sqrt((c1 - c0) * (r1 - r0)) * native_per_pixel for c0, r0, c1, r1 in boxes]


@pytest.mark.parametrize(("crop_px", "scale", "max_px"), [(96, None, 1024.0), (96, 0.5, 1024.0),
                                                          (320, None, 120.0)])
def test_filler_boxes_only_for_classes_without_polygon_boxes_and_sized_by_the_native_rule(tmp_path, crop_px, scale,
                                                                                          max_px):
    raster, labels = scene(tmp_path, pond=True)
    options = TrainOptions(region_max_px=max_px, buffer_px=8)
    grid, sampler = sampler_for(raster, labels, options, crop_px, scale)
    native = 1 / (scale or 1.0)
    by_line = {grid.class_lines[k]: v for k, v in sampler.regions.items()}
    # The pond's one polygon is its only region (no filler squares drowning it), and the rule holds for it.
    assert "pond" in by_line and len(by_line["pond"]) == 1, {k: len(v) for k, v in by_line.items()}
    assert native_sides(by_line["pond"], native)[0] == pytest.approx(100, abs=2.5)
    # The ground has no polygon: filler squares whose sqrt(area) lies in [64, max] native pixels.
    ground = native_sides(by_line["ground"], native)
    assert ground and all(64 - 1e-6 <= side <= max_px + 1e-6 for side in ground), ground
    # Roofs (16 px) have neither polygon boxes nor 80 %-pure squares of 64 native pixels.
    assert "roof" not in by_line
    counts = sampler.region_counts
    assert counts["pond"]["polygon_boxes"] == 1 and counts["pond"]["filler_boxes"] == 0
    assert counts["ground"]["polygon_boxes"] == 0 and counts["ground"]["filler_boxes"] == len(ground)
    assert counts["roof"]["polygon_boxes"] == 0 and counts["roof"]["filler_boxes"] == 0
    assert sampler.region_alignment_runs and sampler.region_warning() is None


def test_a_run_whose_region_alignment_cannot_run_says_so_and_records_it(tmp_path, tiny_model):
    raster, labels = scene(tmp_path / "data", pond=False)
    out, report = tmp_path / "model", tmp_path / "report.json"
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--background", "ground",
                                 "--out", str(out), "--base-model", str(tiny_model), "--epochs", "1",
                                 "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "-q",
                                 "--json", str(report)])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "Region-category alignment" in line]
    assert len(said) == 1, result.output
    assert "'roof'" in said[0] and "64-1024 native pixels" in said[0] and "16 native pixels" in said[0], said[0]
    warnings = [w for w in json.loads(report.read_text())["warnings"] if "Region-category alignment" in w]
    assert len(warnings) == 1 and warnings[0] in said[0]
    regions = json.loads((out / "farslip_model.json").read_text())["region_boxes"]
    assert regions["ran"] is False and regions["why_not"] == warnings[0]
    assert regions["sqrt_area_native_px"] == [64.0, 1024.0]
    assert regions["per_class"]["roof"]["polygon_boxes"] == 0 and regions["per_class"]["roof"]["filler_boxes"] == 0
    assert regions["per_class"]["roof"]["polygon_parts"] > 0
    assert regions["per_class"]["ground"]["filler_boxes"] > 0


def test_a_run_with_region_alignment_records_it_without_a_warning(tmp_path, tiny_model):
    raster, labels = scene(tmp_path / "data", pond=True)
    out = tmp_path / "model"
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--background", "ground",
                                 "--out", str(out), "--base-model", str(tiny_model), "--epochs", "1",
                                 "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "Region-category alignment" not in result.output
    meta = json.loads((out / "farslip_model.json").read_text())
    regions = meta["region_boxes"]
    assert regions["ran"] is True and regions["why_not"] is None
    pond = regions["per_class"]["pond"]
    assert (pond["polygon_boxes"], pond["filler_boxes"], pond["polygon_parts"]) == (1, 0, 1), pond
    assert 64 <= pond["polygon_parts_sqrt_area_native_px"][0] <= 100
    assert "region" in meta["training"]["history"][0]["losses"]
