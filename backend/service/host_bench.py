"""`farslip bench --null-encoder`: how fast everything around the model runs (the host side).

The image encoder is replaced by a zero-cost stand-in with the right output shape (encoders.
NullEncoder), so the figure is what a fast GPU would leave: reading, normalising, the text
similarity, upsampling, blending, softmax, class and score rasters, polygons, files. The quality
estimate's region checks run CLIP's global image path, model time like the dense pass: they use the
stand-in's global path too (their reading and resizing stay in the figure), and the quality
estimate is its own row. The CPU time of the run over all its threads (`host_cpu_s`) says how busy
the cores were: on a machine with few cores the host side's total work, not its overlap, sets the
figure. Memory is measured in child processes at two raster sizes, to show it
stays flat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from backend.engine.devices import usable_cores
from backend.engine.encoders import NullEncoder
from backend.engine.memory import peak_rss_mb
from backend.engine.options import SegmentOptions
from backend.engine.segment import segment_raster

from .bench import BENCH_CLASSES, random_model, rss_ratio_line, type_classes, write_test_raster

# Stages of a segment run, as segment_raster times them (seconds). "read" and "finish" run in threads
# of their own, beside the others; "read_wait" and "finish_wait" are the parts the main thread waited for.
BACKGROUND = ("read_s", "finish_s")
STAGE_NAMES = {
    "read_s": "read + stretch + normalise (background thread)", "read_wait_s": "waiting for the read",
    "rows_s": "crop rows: opened, crops with valid pixels picked",
    "encode_s": "encoder (null), crops batched", "blend_s": "text similarity, upsample, blend",
    "softmax_s": "softmax over the queries",
    "finish_s": "class maxima, classes, scores, pixel signals (finisher thread)",
    "finish_wait_s": "waiting for the finisher", "write_blocks_s": "raster blocks written",
    "polygon_wait_s": "waiting for the polygon thread", "vectorize_s": "polygons: clean-up, areas",
    "quality_s": "quality estimate (region checks with the null CLS stand-in)",
    "write_s": "write polygons",
}


def host_run(raster: Path, out_dir: Path, arch: str, device: str, batch_size: int) -> dict:
    """One segment run of `raster` with the null encoder; figures as a dict."""
    loaded = random_model(arch, torch.device(device))
    encoder = NullEncoder(loaded.model.visual, loaded.device)
    type_classes(loaded, BENCH_CLASSES)  # text is not the host side's cost
    options = SegmentOptions(raster=Path(raster), class_lines=BENCH_CLASSES, batch_size=batch_size, runtime="torch",
                             out=out_dir / "host.gpkg", class_raster=out_dir / "host_classes.tif", overwrite=True)
    cpu_before = os.times()
    started = time.perf_counter()
    result = segment_raster(options, loaded, encoder=encoder)
    seconds = time.perf_counter() - started
    cpu_after = os.times()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    pixels = result.report["pixel_window"]["height"] * result.report["pixel_window"]["width"]
    return {"pixels": pixels, "seconds": seconds, "host_mpx_per_s": pixels / seconds / 1e6, "cpu_s": cpu_s,
            "tiles": result.tiles, "timings": result.timings, "peak_rss_mb": peak_rss_mb(),
            "polygons": sum(c["polygons"] for c in result.classes),
            "region_checks": result.report["quality"]["region_checks"]}


def _child(raster: Path, out_dir: Path, arch: str, device: str, batch_size: int) -> dict:
    args = [sys.executable, "-m", "backend.service.host_bench", str(raster), str(out_dir), arch, device,
            str(batch_size)]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"host benchmark run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (of an even number, the faster of the two middle ones)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def run_host_bench(arch: str = "ViT-B-16", batch_size: int = 8, size: int = 4096, device: str = "cpu",
                   memory_sizes: tuple[int, ...] = (2048, 8192), echo=print, repeat: int = 3) -> dict:
    """`repeat` runs of the host side, each in a fresh process; the figures are the median run's (the
    load of a shared machine moves single runs by 15-30 %), with every run's time beside them."""
    results: dict = {"arch": arch, "device": device, "batch_size": batch_size, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="farslip-bench-") as tmp:
        work = Path(tmp)
        echo(f"# farslip bench --null-encoder: {arch} output shape, {device}, batch {batch_size}, "
             f"{torch.get_num_threads()} threads")
        raster = write_test_raster(work / f"host_{size}.tif", size)
        runs = [_child(raster, work, arch, device, batch_size) for _ in range(max(1, repeat))]
        run = median_run(runs)
        cores = usable_cores()
        results.update(host_mpx_per_s=run["host_mpx_per_s"], seconds=run["seconds"], pixels=run["pixels"],
                       tiles=run["tiles"], polygons=run["polygons"], timings=run["timings"],
                       host_cpu_s=run["cpu_s"], cores=cores, cores_busy=run["cpu_s"] / run["seconds"],
                       runs=[{"seconds": r["seconds"], "host_mpx_per_s": r["host_mpx_per_s"], "cpu_s": r["cpu_s"]}
                             for r in runs])
        echo("")
        if len(runs) > 1:
            rates = sorted(r["host_mpx_per_s"] for r in runs)
            echo(f"{len(runs)} runs, each in a fresh process: {', '.join(f'{r:.1f}' for r in rates)} Mpx/s; "
                 "the table is the median run's.")
            echo("")
        echo(f"| host side, {size}x{size} GeoTIFF -> GPKG + class raster ({run['tiles']} crops, "
             f"{run['polygons']} polygons) | seconds | share of wall time |")
        echo("|---|---|---|")
        wall = run["seconds"]
        shares = {}
        for key, label in STAGE_NAMES.items():
            seconds = run["timings"].get(key, 0.0)
            shares[key] = seconds / wall
            if key == "quality_s":
                label += f", {run['region_checks']} region crops"
            echo(f"| {label} | {seconds:.2f} | {seconds / wall:.1%} |")
        other = max(0.0, wall - sum(run["timings"].get(k, 0.0) for k in STAGE_NAMES if k not in BACKGROUND))
        shares["other_s"] = other / wall  # the row below: the main thread's wall time the stages leave
        echo(f"| everything else (text, setup, Python) | {other:.2f} | {other / wall:.1%} |")
        echo(f"| **total** | {wall:.2f} | **{run['host_mpx_per_s']:.1f} Mpx/s** |")
        echo("\nThe rows marked background thread run beside the others, so the shares add up past 100 %; "
             "'everything else' is the wall time the main thread's rows leave.")
        echo(f"\nCPU time of the run: {run['cpu_s']:.2f} s over its threads, {results['cores_busy']:.1f} of the "
             f"{cores} usable cores busy on average (with every core busy all the time it would take "
             f"{run['cpu_s'] / cores:.2f} s; torch's idle worker threads spin for a while, which counts too).")
        results["stage_share"] = shares
        if memory_sizes:
            echo("")
            echo("| peak RSS, null encoder | MiB | Mpx/s |")
            echo("|---|---|---|")
            memory = {}
            for side in memory_sizes:
                path = write_test_raster(work / f"mem_{side}.tif", side)
                memory[side] = _child(path, work, arch, device, batch_size)
                echo(f"| {side}x{side} ({side * side / 1e6:.3g} Mpx) | {memory[side]['peak_rss_mb']:.0f} | "
                     f"{memory[side]['host_mpx_per_s']:.1f} |")
                path.unlink()
            echo(rss_ratio_line({side: figures["peak_rss_mb"] for side, figures in memory.items()}))
            results["memory"] = {str(k): {"peak_rss_mb": v["peak_rss_mb"], "host_mpx_per_s": v["host_mpx_per_s"]}
                                 for k, v in memory.items()}
    return results


if __name__ == "__main__":
    raster_arg, out_arg, arch_arg, device_arg, batch_arg = sys.argv[1:6]
    print(json.dumps(host_run(Path(raster_arg), Path(out_arg), arch_arg, device_arg, int(batch_arg))))
