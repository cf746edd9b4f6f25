"""Training throughput against a bare forward + backward pass of the same model, and peak memory.

    measure_training(loaded, method="lora", batch_size=4, steps=5) -> dict

"bare" runs the student's dense path on random crops and back-propagates a
sum, with the same trainable parameters; "train" runs full fine-tuning steps
(patch loss, teacher distillation, region alignment, optimiser) on a
synthetic labelled GeoTIFF. The ratio says what FarSLIP's extra passes cost.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
import torch
from rasterio.transform import from_origin

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.raster import open_source

from training import adapters
from backend.engine.memory import peak_rss_mb

from training.api import label_grid_for
from training.finetune import Trainer, TrainingData, TrainOptions
from training.sampling import split_labels


def write_synthetic(folder: Path, size: int = 640, block: int = 64) -> tuple[Path, Path]:
    """A GeoTIFF of three coloured, noisy block classes and a GeoPackage labelling every block."""
    rng = np.random.default_rng(0)
    colours = {"water": (40, 70, 160), "forest": (40, 120, 50), "sand": (210, 190, 130)}
    names = list(colours)
    transform = from_origin(500000, 5000000, 1.0, 1.0)
    rgb = np.zeros((3, size, size), np.float32)
    geometries, values = [], []
    for by in range(size // block):
        for bx in range(size // block):
            name = names[(bx + 2 * by) % 3]
            rgb[:, by * block:(by + 1) * block, bx * block:(bx + 1) * block] = \
                np.array(colours[name], np.float32)[:, None, None]
            x0, y0 = transform @ (bx * block, (by + 1) * block)
            geometries.append(shapely.box(x0, y0, x0 + block, y0 + block))
            values.append(name)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    raster = folder / "bench.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as ds:
        ds.write(rgb)
    labels = folder / "bench.gpkg"
    pyogrio.raw.write(labels, shapely.to_wkb(np.array(geometries)), [np.array(values, dtype=object)], ["cls"],
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:32633")
    return raster, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_backward(loaded, method: str, batch_size: int, steps: int, crop_px: int) -> float:
    """Crops per second of dense forward + backward alone, same trainable parameters."""
    model = copy.deepcopy(loaded.model).float().to(loaded.device)
    adapters.prepare(model, method)
    pixels = normalize_pixels(torch.rand(batch_size, 3, crop_px, crop_px, device=loaded.device) * 255)
    use_amp = loaded.device.type == "cuda"

    def once() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            dense = dense_patch_features(model.visual, pixels)
        dense.float().sum().backward()

    once()
    _sync(loaded.device)
    started = time.perf_counter()
    for _ in range(steps):
        once()
    _sync(loaded.device)
    return batch_size * steps / (time.perf_counter() - started)


def measure_training(loaded, method: str = "lora", batch_size: int = 4, steps: int = 5,
                     options: TrainOptions | None = None) -> dict:
    """Crops/s of full training steps vs a bare forward+backward; peak RSS (and GPU) memory."""
    options = options or TrainOptions(method=method, batch_size=batch_size)
    options.method, options.batch_size = method, batch_size
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    with tempfile.TemporaryDirectory(prefix="farslip-bench-") as folder:
        raster, labels = write_synthetic(Path(folder))
        with open_source(raster) as source:
            grid = label_grid_for(source, labels, "cls", None, None, None)
            transform = source.window_transform(grid.window)
            split = split_labels(grid, transform, options.validation_fraction, options.buffer_px)
            rgb, _ = source.read(grid.window)
            data = TrainingData(rgb, grid, split, transform, source)
            trainer = Trainer(loaded, data, options, total_steps=steps + 1)
            rng = np.random.default_rng(0)
            trainer.step(rng)
            _sync(loaded.device)
            started = time.perf_counter()
            for _ in range(steps):
                trainer.step(rng)
            _sync(loaded.device)
            train_rate = batch_size * steps / (time.perf_counter() - started)
            crop_px = trainer.crop_px
            del trainer
    bare_rate = bare_forward_backward(loaded, method, batch_size, steps, crop_px)
    return {
        "method": method, "batch_size": batch_size, "crop_px": crop_px, "device": str(loaded.device),
        "train_crops_per_s": round(train_rate, 3), "bare_crops_per_s": round(bare_rate, 3),
        "train_vs_bare": round(train_rate / bare_rate, 3),
        "distill_boxes_per_crop": options.distill_boxes, "regions_per_step": options.regions_per_step,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": (round(torch.cuda.max_memory_allocated(loaded.device) / 2**20, 1)
                        if loaded.device.type == "cuda" else None),
    }


def random_loaded(arch: str = "ViT-B-16", device: str = "cpu"):
    """A randomly initialised open_clip model wrapped as a LoadedModel (speed and memory only)."""
    from backend.service.bench import random_model

    return random_model(arch, device)
