"""A training step's time against the sum of the bare model passes it contains, and peak memory.

    measure_training(loaded, method="lora", batch_size=4, steps=5) -> dict

A FarSLIP step legitimately runs three passes: the student's dense forward + backward, the
teacher's dense forward over the distillation boxes, and the region crops' image embeddings
forward + backward. Each is timed bare on random pixels with the same trainable parameters; the
rest of the step (sampling, label rasters, losses, optimiser) is the overhead reported.
"""

from __future__ import annotations

import copy
from functools import partial
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
from backend.engine.models import LoadedModel

from training.api import label_grid_for
from training.finetune import Trainer, TrainingData, TrainOptions
from training.optimisation import amp_dtype
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


def _seconds_per_call(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeat


def bare_passes(loaded: LoadedModel, method: str, options: TrainOptions, crop_px: int, input_px: int,
                repeat: int) -> dict:
    """Seconds of each model pass a FarSLIP step contains, run bare on random pixels (same trainable parameters).

    student: dense forward + backward of the batch; global views: the distillation's student pass on as
    many views; teacher: dense forward (no grad) of the distillation boxes resized to the input;
    region: image-embedding forward + backward of the region crops.
    """
    model = copy.deepcopy(loaded.model).float().to(loaded.device)
    adapters.prepare(model, method)
    device = loaded.device
    # The precision training runs in (training.optimisation.amp_dtype): bf16 only where the GPU computes it.
    precision = amp_dtype(device)
    use_amp, dtype = precision is not None, precision or torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)

    def pixels(count: int, side: int) -> torch.Tensor:
        return normalize_pixels(torch.rand(count, 3, side, side, device=device, generator=generator) * 255)

    batch = pixels(options.batch_size, crop_px)
    boxes = pixels(options.batch_size * options.distill_boxes, crop_px) if options.distill_boxes else None
    regions = pixels(options.regions_per_step, input_px) if options.regions_per_step else None
    # Distillation's global views: one more student pass per step, at the model input size.
    views = pixels(options.batch_size, input_px) if options.distill_boxes else None

    def student() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            dense = dense_patch_features(model.visual, batch, options.attention)
        dense.float().sum().backward()

    @torch.no_grad()
    def teacher() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            dense_patch_features(model.visual, boxes, options.attention)

    def global_views() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            tokens = dense_patch_features(model.visual, views, options.attention, normalize=False)
        tokens.float().sum().backward()

    def region() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=use_amp):
            embeddings = model.encode_image(regions)
        embeddings.float().sum().backward()

    passes = {"student_s": _seconds_per_call(student, device, repeat)}
    if boxes is not None and options.distill_weight > 0:
        passes["global_views_s"] = _seconds_per_call(global_views, device, repeat)
        passes["teacher_s"] = _seconds_per_call(teacher, device, repeat)
    if regions is not None and options.region_weight > 0:
        passes["region_s"] = _seconds_per_call(region, device, repeat)
    return passes


def measure_training(loaded: LoadedModel, method: str = "lora", batch_size: int = 4, steps: int = 5,
                     options: TrainOptions | None = None) -> dict:
    """Seconds per full training step vs the sum of the bare passes it contains; peak RSS (and GPU) memory."""
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
            step_s = _seconds_per_call(partial(trainer.step, rng), loaded.device, steps)
            crop_px, input_px = trainer.crop_px, trainer.input_px
            trainer = None  # free the student and optimiser before the bare passes
    passes = bare_passes(loaded, method, options, crop_px, input_px, steps)
    bare_s = sum(passes.values())
    return {
        "method": method, "batch_size": batch_size, "crop_px": crop_px, "device": str(loaded.device),
        "step_s": round(step_s, 3), **{k: round(v, 3) for k, v in passes.items()},
        "bare_passes_s": round(bare_s, 3), "overhead_share": round(1 - bare_s / step_s, 3),
        "train_crops_per_s": round(batch_size / step_s, 3),
        "distill_boxes_per_crop": options.distill_boxes, "regions_per_step": options.regions_per_step,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": (round(torch.cuda.max_memory_allocated(loaded.device) / 2**20, 1)
                        if loaded.device.type == "cuda" else None),
    }


def format_training(results: dict) -> str:
    """The step against its bare passes, as a table."""
    step = results["step_s"]
    rows = ["| training step, " + f"{results['method']}, batch {results['batch_size']}, {results['crop_px']} px "
            f"crops, {results['device']} | seconds | share of the step |", "|---|---|---|"]
    names = {"student_s": "student dense forward + backward",
             "global_views_s": "student global views forward + backward (distillation)",
             "teacher_s": f"teacher dense forward ({results['distill_boxes_per_crop']} boxes per view)",
             "region_s": f"region embeddings forward + backward ({results['regions_per_step']} crops)"}
    for key, label in names.items():
        if key in results:
            rows.append(f"| bare {label} | {results[key]:.3f} | {results[key] / step:.1%} |")
    rows.append(f"| sum of the bare passes | {results['bare_passes_s']:.3f} | {results['bare_passes_s'] / step:.1%} |")
    rows.append(f"| full step (sampling, labels, losses, optimiser included) | {step:.3f} | 100% |")
    rows.append(f"| **overhead** | {step - results['bare_passes_s']:.3f} | **{results['overhead_share']:.1%}** |")
    return "\n".join(rows)


def random_loaded(arch: str = "ViT-B-16", device: str = "cpu"):
    """A randomly initialised open_clip model wrapped as a LoadedModel (speed and memory only)."""
    from backend.service.bench import random_model

    return random_model(arch, device)
