"""`farslip bench --search`: index build speed, size and peak memory against raster size, query latency,
and the cost of the sub-perspectives against the alternatives, each against a baseline in the same run.

Memory and size use a tiny random checkpoint (embedding width 64; the index of a real ViT-B is 8x
larger per window, 512 dimensions) so that a 100 Mpx raster indexes in minutes on a laptop CPU
(a real ViT-B/16 embeds a few windows per second per CPU core: the model, not the index, sets the pace);
latency is measured over that index at full width by padding the vectors to 512 dimensions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backend.engine.dense import normalize_pixels
from backend.engine.memory import peak_rss_mb
from backend.engine.search import sentence_scores, suppress_overlaps
from backend.engine.search_index import PERSPECTIVES, embed_windows

from .bench import random_model, tiny_checkpoint, write_test_raster


def index_run(raster: str, model_path: str, cache: str) -> None:
    """Child process: build the whole index of `raster`, print figures and peak RSS as JSON."""
    import os

    os.environ["FARSLIP_CACHE"] = cache
    from backend.engine.models import load_model
    from backend.engine.search_index import describe, open_index

    loaded = load_model(model_path)
    with open_index(raster, loaded, batch_size=16) as index:
        stats = index.ensure()
        info = describe(index, stats)
        started = time.perf_counter()
        entries = index.entries()
        load_s = time.perf_counter() - started
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "windows": stats.computed, "seconds": stats.seconds,
                      "size_bytes": info["size_bytes"], "load_s": load_s, "entries": len(entries.level)}))


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "backend.service.search_bench", *args], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"index run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def query_latency(windows: int, dim: int = 512, keywords: int = 2, top: int = 20, repeat: int = 5) -> dict:
    """Brute-force numpy ranking over `windows` windows of a full-width index (vectors already in memory)."""
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((windows, len(PERSPECTIVES), dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=-1, keepdims=True)
    side = int(np.sqrt(windows)) + 1
    rows, cols = np.divmod(np.arange(windows), side)
    bounds = np.stack([cols * 112.0, rows * 112.0, cols * 112.0 + 224, rows * 112.0 + 224], axis=1)
    sentence = embeddings[0, 0]
    words = embeddings[1:1 + keywords, 1]
    start = time.perf_counter()
    for _ in range(repeat):
        scores = sentence_scores(embeddings, sentence, words)
    score_s = (time.perf_counter() - start) / repeat
    start = time.perf_counter()
    for _ in range(repeat):
        suppress_overlaps(bounds, scores, top)
    nms_s = (time.perf_counter() - start) / repeat
    start = time.perf_counter()
    for _ in range(repeat):
        sentence_scores(embeddings, sentence, None)
    global_s = (time.perf_counter() - start) / repeat
    return {"windows": windows, "dim": dim, "score_s": score_s, "nms_s": nms_s, "global_only_s": global_s,
            "index_mb": embeddings.nbytes / 2**20}


@torch.inference_mode()
def perspective_cost(arch: str, batch: int = 4, device: str = "cpu") -> dict:
    """Seconds per batch: CLS only (baseline), CLS + pooled dense sub-perspectives (what the index does),
    CLS + CLS of the five sub-crops resized to 224 (the alternative)."""
    loaded = random_model(arch, device)
    crops = torch.rand(batch, 3, 224, 224, device=loaded.device) * 255

    def cls_only():
        loaded.model.encode_image(normalize_pixels(crops))

    def pooled():
        embed_windows(loaded, crops.cpu().numpy())

    def sub_crops():
        pieces = [crops, crops[..., :112, :112], crops[..., :112, 112:], crops[..., 112:, :112],
                  crops[..., 112:, 112:], crops[..., 56:168, 56:168]]
        for piece in pieces:
            resized = F.interpolate(piece, size=(224, 224), mode="bilinear", align_corners=False)
            loaded.model.encode_image(normalize_pixels(resized))

    def synchronize():  # a GPU's time: until the work queued there is done
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    cls_only()  # warm-up
    figures = {}
    for name, fn in (("cls_s", cls_only), ("pooled_s", pooled), ("subcrops_s", sub_crops)):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        figures[name] = time.perf_counter() - start
    return figures


def run_search_bench(arch: str = "ViT-B-16", sides: tuple[int, ...] = (3000, 10000), device: str = "cpu",
                     echo=print, perspectives: bool = True) -> dict:
    results: dict = {"arch": arch, "device": device, "threads": torch.get_num_threads()}
    echo(f"# farslip bench --search: {device}, {torch.get_num_threads()} threads")
    if perspectives:
        _perspective_table(arch, device, results, echo)
    _index_and_query_tables(sides, results, echo)
    return results


def _perspective_table(arch: str, device: str, results: dict, echo) -> None:
    cost = perspective_cost(arch, device=device)
    results["perspectives"] = cost
    echo("")
    echo(f"| sub-perspectives, {arch} random weights, batch 4 | seconds | ratio |")
    echo("|---|---|---|")
    echo(f"| image embedding only (CLS) | {cost['cls_s']:.3f} | 1.00 (baseline) |")
    echo(f"| CLS + 5 pooled dense sub-regions (the index) | {cost['pooled_s']:.3f} | "
         f"{cost['pooled_s'] / cost['cls_s']:.2f} |")
    echo(f"| CLS + CLS of 5 sub-crops at 224 | {cost['subcrops_s']:.3f} | {cost['subcrops_s'] / cost['cls_s']:.2f} |")


def _index_and_query_tables(sides: tuple[int, ...], results: dict, echo) -> None:
    with tempfile.TemporaryDirectory(prefix="farslip-search-bench-") as tmp:
        work = Path(tmp)
        # The smallest ViT the index code runs unchanged: the runs measure reading, resampling and storing.
        tiny = tiny_checkpoint(work / "tiny.pt", patch_size=32, width=64, layers=1)
        runs = {}
        echo("")
        echo("| index build, tiny model, whole raster | windows | seconds | windows/s | index MiB | peak RSS MiB |")
        echo("|---|---|---|---|---|---|")
        for side in sides:
            raster = write_test_raster(work / f"search_{side}.tif", side)
            runs[side] = _child(["index", str(raster), str(tiny), str(work / f"cache_{side}")])
            run = runs[side]
            echo(f"| {side}x{side} ({side * side / 1e6:.0f} Mpx) | {run['windows']} | {run['seconds']:.1f} | "
                 f"{run['windows'] / run['seconds']:.1f} | {run['size_bytes'] / 2**20:.2f} | "
                 f"{run['peak_rss_mb']:.0f} |")
            raster.unlink()
        results["index"] = runs
        small, large = min(runs), max(runs)
        echo(f"\npeak RSS ratio {runs[large]['peak_rss_mb'] / runs[small]['peak_rss_mb']:.2f} for "
             f"{(large / small) ** 2:.1f}x the pixels; index size ratio "
             f"{runs[large]['size_bytes'] / runs[small]['size_bytes']:.1f}")
        full_width_mb = runs[large]["size_bytes"] / 2**20 * 512 / 64
        echo(f"a 512-dimension model's index of {large}x{large}: about {full_width_mb:.0f} MiB")

    latency = query_latency(runs[large]["windows"])
    results["query"] = latency
    echo("")
    echo(f"| query over {latency['windows']} windows x {len(PERSPECTIVES)} perspectives x 512 (numpy, "
         "in memory) | ms | ratio |")
    echo("|---|---|---|")
    echo(f"| global cosine only | {1000 * latency['global_only_s']:.1f} | 1.00 (baseline) |")
    echo(f"| global + 2 keywords x best perspective | {1000 * latency['score_s']:.1f} | "
         f"{latency['score_s'] / latency['global_only_s']:.1f} |")
    echo(f"| + suppression of overlaps, top 20 | {1000 * latency['nms_s']:.1f} | |")
    echo(f"| loading the tiny index from disk ({runs[large]['entries']} windows) | "
         f"{1000 * runs[large]['load_s']:.0f} | |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["index"]:
        index_run(*sys.argv[2:5])
