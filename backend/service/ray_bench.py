"""`farslip bench --ray`: chunks/s of `segment --workers` with 1 and 2 workers against one process, and
how the driver's share (assembling rasters, polygons, merge) changes as the chunks get smaller.

A synthetic raster and a random model of the chosen architecture (speed only) are written to a
temporary folder; every run segments the same raster with the same classes.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .bench import random_model, write_test_raster

CLASSES = ["water, lake", "road", "building", "tree", "field"]


def _scaled(raster: Path, model: Path, out: Path, workers: int, chunk: int, device: str) -> dict:
    from backend.scale.run import ScaleRequest, segment_rasters
    from backend.scale.worker import EngineSettings

    engine = EngineSettings(class_lines=list(CLASSES), model=str(model), device=device, chunk_rows=chunk,
                            chunk_columns=chunk)
    started = time.perf_counter()
    result = segment_rasters([str(raster)], engine, ScaleRequest(out, workers=workers, restart=True))
    total = time.perf_counter() - started
    t = result.timings
    finish = sum(r["finish_s"] for r in result.rasters)
    return {"workers": workers, "chunk": chunk, "chunks": result.chunks["total"], "total_s": round(total, 2),
            "start_s": round(t.get("workers_s", 0.0), 2), "chunks_s": round(t["chunks_s"], 2),
            "chunks_per_s": round(result.chunks["total"] / t["chunks_s"], 3),
            "s_per_chunk": round(t["chunks_s"] / result.chunks["total"], 2),
            "finish_s": round(finish, 2), "finish_wait_s": round(t.get("finish_wait_s", 0.0), 2),
            "merge_s": round(t["merge_s"], 2),
            "driver_share": round((t.get("finish_wait_s", 0.0) + t["merge_s"]) / total, 3)}


def _single(raster: Path, model: Path, out: Path, device: str) -> dict:
    from backend.engine.models import load_model
    from backend.engine.options import SegmentOptions
    from backend.engine.segment import segment_raster

    loaded = load_model(str(model), None, device)
    started = time.perf_counter()
    result = segment_raster(SegmentOptions(raster=raster, class_lines=list(CLASSES), out=out, model=str(model),
                                           overwrite=True), loaded)
    return {"total_s": round(time.perf_counter() - started, 2), "tiles": result.tiles}


def run_ray_bench(arch: str = "ViT-B-16", size: int = 1024, device: str = "cpu", chunk: int = 512,
                  sweep: tuple[int, ...] = (1024, 512, 256), echo: Callable[[str], None] = print) -> dict:
    with tempfile.TemporaryDirectory(prefix="farslip-ray-bench-") as folder:
        work = Path(folder)
        raster = write_test_raster(work / "raster.tif", size)
        model = work / "model.pt"
        torch.save(random_model(arch).model.state_dict(), model)
        echo(f"raster {size} x {size} px, model random {arch}, {device}, classes {len(CLASSES)}")
        single = _single(raster, model, work / "single.gpkg", device)
        echo(f"single process: {single['total_s']} s ({single['tiles']} crops)")
        runs = [_scaled(raster, model, work / f"w{w}.gpkg", w, chunk, device) for w in (1, 2)]
        sweep_runs = [_scaled(raster, model, work / f"c{c}.gpkg", 2, c, device) for c in sweep]
    one, two = runs
    lines = [f"{'workers':>7} {'chunk':>6} {'chunks':>6} {'chunks/s':>9} {'s/chunk':>8} {'start s':>8} "
             f"{'total s':>8} {'vs 1 worker':>11} {'vs single':>9}"]
    for run in runs:
        lines.append(f"{run['workers']:>7} {run['chunk']:>6} {run['chunks']:>6} {run['chunks_per_s']:>9.3f} "
                     f"{run['s_per_chunk']:>8.2f} {run['start_s']:>8.1f} {run['total_s']:>8.1f} "
                     f"{run['chunks_per_s'] / one['chunks_per_s']:>10.2f}x "
                     f"{single['total_s'] / run['total_s']:>8.2f}x")
    lines.append("")
    lines.append(f"{'chunk':>6} {'chunks':>6} {'chunks s':>9} {'finish s':>9} {'merge s':>8} {'total s':>8} "
                 f"{'driver share':>12}")
    for run in sweep_runs:
        lines.append(f"{run['chunk']:>6} {run['chunks']:>6} {run['chunks_s']:>9.1f} {run['finish_s']:>9.2f} "
                     f"{run['merge_s']:>8.2f} {run['total_s']:>8.1f} {run['driver_share']:>11.1%}")
    echo("\n".join(lines))
    return {"arch": arch, "size": size, "device": device, "single": single, "workers": runs, "sweep": sweep_runs,
            "speedup_2_vs_1": round(two["chunks_per_s"] / one["chunks_per_s"], 3)}
