"""`farslip bench`: speed and memory of the engine, each figure against a baseline in the same run.

Speed does not depend on weight values, so the full-size rows use a randomly
initialised open_clip model of the chosen architecture (QuickGELU, as the
FarSLIP checkpoints); the memory rows use a tiny model so that a 10k x 10k
raster finishes in minutes on a laptop CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import open_clip
import rasterio
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.encoders import TorchEncoder, autocast_enabled
from backend.engine.feature_cache import FeatureCache
from backend.engine.runtimes import error_reason, make_encoder, measured_speeds, timing_batch
from backend.engine.sliding import ArraySource, Segmenter, predict_window
from backend.engine.errors import InputError
from backend.engine.memory import peak_rss_mb
from backend.engine.models import LoadedModel, get_tokenizer
from backend.engine.options import SegmentOptions
from backend.engine.segment import SegmentResult, segment_raster
from backend.engine.text import PROMPT_TEMPLATES, TextEmbedder, encode_tokens, query_index
from backend.engine.presets import parse_class_lines
from backend.engine.text_prefix import eligible as prefixes_eligible
from backend.engine.text_prefix import encode_with_prefixes

BENCH_CLASSES = ["water, lake", "cropland, bare field", "grassland", "road", "building, roof"]
# Back-to-back pairs of a segment run and the reference loop for the runtime's ratio to the loop.
REFERENCE_PAIRS = 3
RERUN_CLASSES = ["forest, trees", "shed", "parking lot"]
NEW_CLASSES = ["river", "greenhouse, barn"]


ARCH_EXAMPLES = "e.g. ViT-B-16, ViT-B-32, ViT-L-14"
CLIP_VOCABULARY = 49408  # the BPE tokenizer's, which the benchmarks' random models use


def arch_config(arch: str) -> dict:
    """open_clip's configuration of the architecture `arch`; InputError for a name it does not know, and for one
    the benchmarks cannot build and run as FarSLIP: the dense pass needs open_clip's own Vision Transformer (not
    a ResNet or a timm tower), and random weights need a text tower built here (not one from Hugging Face)."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise InputError(f"Unknown open_clip architecture {arch!r}; {ARCH_EXAMPLES}.")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        tower = f"a timm model ({vision['timm_model_name']})" if vision.get("timm_model_name") else "a ResNet"
        raise InputError(f"The image tower of {arch} is {tower}, not open_clip's Vision Transformer, which the dense "
                         f"pass runs; benchmark a ViT architecture ({ARCH_EXAMPLES}).")
    hf_part = text.get("hf_model_name") or text.get("hf_tokenizer_name")
    if hf_part:
        raise InputError(f"The text tower of {arch} comes from Hugging Face ({hf_part}), which a benchmark with "
                         f"random weights does not download; benchmark {ARCH_EXAMPLES}.")
    if vision.get("output_tokens") or vision.get("attentional_pool") or "multimodal_cfg" in cfg or \
            text.get("vocab_size", CLIP_VOCABULARY) != CLIP_VOCABULARY:
        raise InputError(f"{arch} is not a CLIP model as FarSLIP's (a captioning tower, or another tokenizer's "
                         f"vocabulary), which the benchmarks build; benchmark {ARCH_EXAMPLES}.")
    return cfg


def random_model(arch: str = "ViT-B-16", device: torch.device | str = "cpu",
                 context_length: int | None = None) -> LoadedModel:
    """A randomly initialised open_clip model of `arch` (QuickGELU) as a LoadedModel: speed and memory only."""
    cfg = arch_config(arch)
    text_cfg = dict(cfg["text_cfg"], context_length=context_length) if context_length else cfg["text_cfg"]
    model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=text_cfg,
                                 quick_gelu=True)
    dev = torch.device(device)
    ctx = model.context_length
    return LoadedModel(model=model.eval().to(dev), name=f"random-{arch}", tokenizer=get_tokenizer(ctx),
                       context_length=ctx, weights_id=f"random-{arch}-{ctx}-untrained", device=dev)


ZOOM_SIDE = 300  # pixels: the zoomed-in re-run's part of the bench raster (under AUTO_MIN_CROPS crops)


def _central_part(size: int, side: int) -> tuple[float, float, float, float]:
    """The bbox of the central `side` x `side` pixels (at most the raster) of write_test_raster's raster."""
    side = min(side, size)
    x0, top = 500000 + (size - side) // 2, 5_000_000 - (size - side) // 2
    return float(x0), float(top - side), float(x0 + side), float(top)


def write_test_raster(path: Path, size: int, block: int = 1024) -> Path:
    """A smooth synthetic RGB GeoTIFF (fields of colour), written block by block."""
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 5_000_000, 1.0, 1.0), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, size, block):
            h = min(block, size - row)
            yy = np.arange(row, row + h, dtype=np.float32)[:, None]
            xx = np.arange(size, dtype=np.float32)[None, :]
            r = 128 + 100 * np.sin(xx / 397.0) * np.cos(yy / 263.0)
            g = 128 + 90 * np.cos(xx / 211.0 + yy / 331.0)
            b = 128 + 80 * np.sin((xx + yy) / 173.0)
            ds.write(np.stack([r, g, b]).clip(0, 255).astype(np.uint8), window=((row, row + h), (0, size)))
    return path


def _time(fn, repeat: int = 1, device: torch.device | None = None) -> float:
    """Seconds per call of fn; on a CUDA `device`, until the work it queued there is done."""
    def synchronize():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeat


def bench_encoder(loaded: LoadedModel, batch_size: int, batches: int, encoder=None) -> float:
    """Bare dense image-encoder throughput (crops/s), no I/O or post-processing."""
    encoder = encoder or TorchEncoder(loaded.model.visual, "segearth", loaded.device)
    crops = torch.rand(batch_size, 3, 224, 224, device=loaded.device) * 255

    @torch.inference_mode()
    def step():
        encoder(normalize_pixels(crops))
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    step()  # warm-up
    return batch_size * batches / _time(lambda: [step() for _ in range(batches)])


def _seeded_crops(batch_size: int, device: torch.device) -> torch.Tensor:
    """The same normalised random crops every time, on `device`: the outputs compared between encoders."""
    pixels = torch.rand(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 255
    return normalize_pixels(pixels.to(device))


def bench_runtimes(loaded: LoadedModel, batch_size: int, batches: int, torch_rate: float) -> dict:
    """Each installed compiled runtime: bare encoder crops/s and its largest difference from torch.

    The compiled runtimes run on the CPU only: on another device there is nothing to compare."""
    from backend.engine.runtimes import COMPILED, compiled_encoder, runtime_installed

    found: dict = {}
    if loaded.device.type != "cpu":
        return found
    crops = _seeded_crops(batch_size, loaded.device)
    with torch.inference_mode():
        expected = dense_patch_features(loaded.model.visual, crops)
    for name in COMPILED:
        if not runtime_installed(name):
            continue
        try:
            encoder = compiled_encoder(name, loaded, "segearth")
        except Exception as error:  # report, never fail the benchmark
            found[name] = {"error": error_reason(error)[:200]}
            continue
        rate = bench_encoder(loaded, batch_size, batches, encoder)
        diff = float((encoder(crops) - expected).abs().max())
        found[name] = {"crops_s": rate, "vs_torch": rate / torch_rate, "max_abs_diff": diff}
    return found


def bench_precision(loaded: LoadedModel, batch_size: int, batches: int, autocast_rate: float) -> dict:
    """On a CUDA GPU, where the engine runs the encoder under fp16 autocast: the same encoder in fp32
    (crops/s, its speed against autocast's, and autocast's largest difference from fp32)."""
    fp32 = TorchEncoder(loaded.model.visual, "segearth", loaded.device, half=False)
    autocast = TorchEncoder(loaded.model.visual, "segearth", loaded.device)
    crops = _seeded_crops(batch_size, loaded.device)
    with torch.inference_mode():
        diff = float((autocast(crops) - fp32(crops)).abs().max())
    rate = bench_encoder(loaded, batch_size, batches, fp32)
    return {"encoder": autocast.name, "fp32_crops_s": rate, "autocast_vs_fp32": autocast_rate / rate,
            "max_abs_diff": diff}


def reference_loop(loaded: LoadedModel, text: torch.Tensor, image: np.ndarray) -> int:
    """FARSLIP_METHOD.md section 4 as written: one crop at a time, full-size accumulator."""
    _, height, width = image.shape
    crop, stride = 224, 112
    acc = torch.zeros(text.shape[0], height, width)
    count = torch.zeros(height, width)
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    with torch.inference_mode():
        for i in range(rows):
            for j in range(cols):
                y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                pixels = normalize_pixels(torch.from_numpy(image[None, :, y1:y2, x1:x2].copy()).to(loaded.device))
                feats = dense_patch_features(loaded.model.visual, pixels)
                logits = (feats[0] @ text.T.to(feats.device)).permute(2, 0, 1)[None]
                logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
                acc[:, y1:y2, x1:x2] += logits[0].cpu()
                count[y1:y2, x1:x2] += 1
    torch.softmax(acc / count * 50, dim=0).argmax(dim=0)
    return rows * cols


def _queries(class_lines: list[str]) -> list[str]:
    """The text queries a run with these class lines asks for: each synonym of a line ("water, lake")
    is a query of its own."""
    return query_index(parse_class_lines(class_lines))[0]


def type_classes(loaded: LoadedModel, class_lines: list[str]) -> None:
    """Embed (and cache on disk) the text queries of these class lines, as if the user had typed them before."""
    TextEmbedder(loaded).embed(_queries(class_lines))


def _forget_text(loaded: LoadedModel, class_lines: list[str]) -> None:
    """Remove the disk-cached text embeddings of these classes, as if nobody had typed them yet."""
    embedder = TextEmbedder(loaded)
    for query in _queries(class_lines):
        path = embedder._cache_file(query)
        if path is not None:
            path.unlink(missing_ok=True)


def _split(result: SegmentResult) -> str:
    """Where a run's time went: text, engine, polygons + files, quality estimate (its region checks)."""
    t, quality = result.timings, result.report["quality"]
    rest = t["total_s"] - t.get("text_s", 0.0) - t.get("inference_s", 0.0) - t.get("quality_s", 0.0)
    return (f"text {t.get('text_s', 0.0):.2f}, engine {t.get('inference_s', 0.0):.2f}, quality "
            f"{t.get('quality_s', 0.0):.2f} ({quality['region_checks']} region checks, "
            f"{quality.get('region_cached', 0)} cached), polygons + files {rest:.2f}")


def _same_raster(a: Path, b: Path) -> bool:
    with rasterio.open(a) as first, rasterio.open(b) as second:
        return bool(np.array_equal(first.read(), second.read()))


def bench_text(loaded: LoadedModel, workdir: Path) -> dict:
    """Seconds per class query: full context vs truncated, cold vs disk-cached."""
    query = "parking lot"
    tokens = loaded.tokenizer([t.format(query) for t in PROMPT_TEMPLATES]).to(loaded.device)
    with torch.inference_mode():
        full = _time(lambda: loaded.model.encode_text(tokens), device=loaded.device)
        short = _time(lambda: encode_tokens(loaded.model, tokens), device=loaded.device)
        diff = (loaded.model.encode_text(tokens) - encode_tokens(loaded.model, tokens)).abs().max().item()
        shared: dict = {}
        if prefixes_eligible(loaded.model):  # the templates' beginnings run once (kept per model)
            encode_with_prefixes(loaded.model, loaded.tokenizer, PROMPT_TEMPLATES, query)
            run = _time(lambda: encode_with_prefixes(loaded.model, loaded.tokenizer, PROMPT_TEMPLATES, query),
                        device=loaded.device)
            got = encode_with_prefixes(loaded.model, loaded.tokenizer, PROMPT_TEMPLATES, query)
            shared = {"shared_beginnings_s": run,
                      "shared_beginnings_max_abs_diff": (got - encode_tokens(loaded.model, tokens)).abs().max().item()}
    cold_embedder = TextEmbedder(loaded, cache=workdir / "textcache")
    cold = _time(lambda: cold_embedder.embed(["sports field"]))
    warm = _time(lambda: TextEmbedder(loaded, cache=workdir / "textcache").embed(["sports field"]))
    return {"full_s": full, "truncated_s": short, "max_abs_diff": diff, "cold_s": cold, "cached_s": warm, **shared}


def _rss_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "backend.service.bench", *args], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_run(raster: str, model_path: str, out_dir: str, batch_size: int) -> None:
    """Child process: segment `raster` with a checkpoint and print peak RSS as JSON."""
    from backend.engine.models import load_model

    loaded = load_model(model_path)
    start = time.perf_counter()
    options = SegmentOptions(raster=Path(raster), class_lines=BENCH_CLASSES[:3], batch_size=batch_size,
                             out=Path(out_dir) / "rss.gpkg", class_raster=Path(out_dir) / "rss_classes.tif")
    result = segment_raster(options, loaded)
    peak_mb = peak_rss_mb()
    print(json.dumps({"peak_rss_mb": peak_mb, "tiles": result.tiles, "seconds": time.perf_counter() - start,
                      "polygons": sum(c["polygons"] for c in result.classes)}))


def run_bench(arch: str = "ViT-B-16", batch_size: int = 8, size: int = 1024, device: str = "cpu",
              rss_sizes: tuple[int, ...] = (2000, 10000), echo=print) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    results: dict = {"arch": arch, "device": str(dev), "batch_size": batch_size, "torch": torch.__version__,
                     "threads": torch.get_num_threads()}
    loaded = random_model(arch, dev)
    with tempfile.TemporaryDirectory(prefix="farslip-bench-") as tmp:
        work = Path(tmp)
        echo(f"# farslip bench: {arch} (random weights; speed only), {dev}, batch {batch_size}, "
             f"{torch.get_num_threads()} threads")
        encoder = bench_encoder(loaded, batch_size, batches=3)
        results["encoder_crops_s"] = encoder

        runtimes = bench_runtimes(loaded, batch_size, 3, encoder)
        results["runtimes"] = runtimes
        precision = bench_precision(loaded, batch_size, 3, encoder) if autocast_enabled(dev, None) else None
        if precision is not None:
            results["precision"] = precision

        raster = write_test_raster(work / f"bench_{size}.tif", size)
        TextEmbedder(loaded, cache=None).embed(["warm-up"])

        def timed_segment(name: str, classes: list[str], runtime: str, cache=None, region_checks: bool = True,
                          bbox: tuple[float, float, float, float] | None = None):
            options = SegmentOptions(raster=Path(raster), class_lines=classes, batch_size=batch_size, runtime=runtime,
                                     out=work / f"{name}.gpkg", class_raster=work / f"{name}.tif",
                                     region_checks=region_checks, bbox=bbox)
            start = time.perf_counter()
            result = segment_raster(options, loaded, feature_cache=cache)
            return result, time.perf_counter() - start

        torch_run, torch_s = timed_segment("torch", BENCH_CLASSES, "torch")
        pipeline = torch_run.tiles / (torch_s - torch_run.timings.get("text_s", 0.0))
        results["pipeline_crops_s"] = pipeline
        # A compiled runtime is built once per model (a server keeps it); the first run is timed without it.
        started = time.perf_counter()
        built = make_encoder(loaded, "segearth", "auto", crops=torch_run.tiles)
        if hasattr(built, "embed_images"):  # the region checks' global path, compiled on first use
            with torch.inference_mode():
                built.embed_images(normalize_pixels(torch.rand(1, 3, 224, 224) * 255))
        results["auto_encoder_build_s"] = time.perf_counter() - started
        results["auto_timed_crops_s"] = measured_speeds(loaded, "segearth")  # what auto's choice rests on
        cache = FeatureCache(max_bytes=2 << 30)
        first, first_s = timed_segment("first", BENCH_CLASSES, "auto", cache)
        auto_name = first.report["encoder"]
        auto_rate = first.tiles / (first_s - first.timings.get("text_s", 0.0))
        type_classes(loaded, RERUN_CLASSES)  # classes the user has typed before (on another extent)
        rerun, rerun_s = timed_segment("rerun", RERUN_CLASSES, "auto", cache)
        _forget_text(loaded, NEW_CLASSES)  # classes never typed before: their text is encoded in the run
        cold, cold_s = timed_segment("cold", NEW_CLASSES, "auto", cache)
        timed_segment("same", BENCH_CLASSES, "auto", cache)
        identical = _same_raster(work / "first.tif", work / "same.tif")
        # Zoomed in: a 300 x 300 part of the first extent (fewer crops than auto exports a runtime for), with
        # classes typed before; against the same part uncached on torch, which is what auto ran there before a
        # zoomed-in run took the runtime the first run had exported (and so found none of its features).
        part = _central_part(size, ZOOM_SIDE)
        zoom, zoom_s = timed_segment("zoom", RERUN_CLASSES, "auto", cache, region_checks=False, bbox=part)
        zoom_torch, zoom_torch_s = timed_segment("zoom_torch", RERUN_CLASSES, "torch", FeatureCache(max_bytes=2 << 30),
                                                 region_checks=False, bbox=part)
        results.update(zoom_rerun_s=zoom_s, zoom_rerun_fraction=zoom_s / first_s, zoom_features=zoom.features,
                       zoom_encoder=zoom.report["encoder"], zoom_uncached_torch_s=zoom_torch_s)
        # The reference loop writes no quality estimate: the same output is a run without region checks.
        cache_plain = FeatureCache(max_bytes=2 << 30)
        plain, plain_s = timed_segment("plain", BENCH_CLASSES, "auto", cache_plain, region_checks=False)
        plain_rate = plain.tiles / (plain_s - plain.timings.get("text_s", 0.0))
        plain_rerun, plain_rerun_s = timed_segment("plain_rerun", RERUN_CLASSES, "auto", cache_plain,
                                                   region_checks=False)
        results.update(auto_no_region_checks_crops_s=plain_rate, first_run_no_region_checks_s=plain_s,
                       rerun_no_region_checks_s=plain_rerun_s, rerun_no_region_checks_fraction=plain_rerun_s / plain_s)
        results.update(auto_runtime=auto_name, auto_pipeline_crops_s=auto_rate, first_run_s=first_s,
                       rerun_new_classes_s=rerun_s, rerun_fraction=rerun_s / first_s,
                       rerun_features=rerun.features, rerun_timings=rerun.timings,
                       rerun_cold_text_s=cold_s, rerun_cold_text_fraction=cold_s / first_s,
                       rerun_cold_text_timings=cold.timings, cached_output_identical=identical)

        with rasterio.open(raster) as ds:
            image = ds.read().astype(np.float32)
        segmenter = Segmenter(loaded, parse_class_lines(BENCH_CLASSES), batch_size=batch_size)

        def timed_reference() -> tuple[int, float]:
            start = time.perf_counter()
            crops = reference_loop(loaded, segmenter.text, image)
            return crops, crops / (time.perf_counter() - start)

        crops, reference = timed_reference()
        results["reference_crops_s"] = reference
        # A shared machine's speed drifts over a bench by more than the gap measured here: the runtime's
        # ratio to the reference loop comes from pairs run back to back (a run without region checks, then
        # the loop), the median pair's.
        pairs = [(plain_rate, reference)]
        for pair in range(1, REFERENCE_PAIRS):
            again, again_s = timed_segment(f"plain_{pair}", BENCH_CLASSES, "auto", FeatureCache(max_bytes=2 << 30),
                                           region_checks=False)
            pairs.append((again.tiles / (again_s - again.timings.get("text_s", 0.0)), timed_reference()[1]))
        pair_ratios = [run / loop for run, loop in pairs]
        results["auto_no_region_checks_vs_reference"] = {
            "ratios": pair_ratios, "median": median(pair_ratios),
            "pairs_crops_s": [{"auto_no_region_checks": run, "reference": loop} for run, loop in pairs]}
        start = time.perf_counter()
        predict_window(segmenter, ArraySource(image))
        in_memory = crops / (time.perf_counter() - start)
        results["engine_in_memory_crops_s"] = in_memory

        echo("")
        echo("| measurement | crops/s | ratio |")
        echo("|---|---|---|")
        name = "torch, fp16 autocast" if precision is not None else "torch"
        echo(f"| bare dense image encoder ({name}), batch {batch_size} | {encoder:.2f} | 1.00 (baseline) |")
        if precision is not None:
            echo(f"| bare encoder, torch fp32 (autocast off) | {precision['fp32_crops_s']:.2f} | autocast is "
                 f"{precision['autocast_vs_fp32']:.2f}x fp32 (max diff {precision['max_abs_diff']:.1e}) |")
        for name, figures in runtimes.items():
            if "error" in figures:
                echo(f"| bare encoder, {name} | - | could not compile: {figures['error']} |")
            else:
                echo(f"| bare encoder, {name} | {figures['crops_s']:.2f} | {figures['vs_torch']:.2f}x torch "
                     f"(max diff {figures['max_abs_diff']:.1e}) |")
        timed = results["auto_timed_crops_s"]
        if timed:
            echo(f"| `--runtime auto`'s own timing on this computer (batch {timing_batch()}, kept in the cache) | "
                 f"{', '.join(f'{name} {value:.2f}' if value else f'{name} -' for name, value in timed.items())} | "
                 f"auto runs {auto_name} |")
        echo(f"| `segment --runtime torch`, {size}x{size} GeoTIFF -> GPKG ({torch_run.tiles} crops) | "
             f"{pipeline:.2f} | {pipeline / encoder:.2f} of encoder |")
        echo(f"| `segment --runtime auto` ({auto_name}), same raster | {auto_rate:.2f} | "
             f"{auto_rate / reference:.2f}x the reference loop |")
        echo(f"| `segment --runtime auto --no-region-checks` (the reference loop's output) | {plain_rate:.2f} | "
             f"{plain_rate / reference:.2f}x the reference loop |")
        echo(f"| engine on the same image in memory (torch) | {in_memory:.2f} | "
             f"{in_memory / encoder:.2f} of encoder |")
        echo(f"| reference loop (section 4, one crop at a time) | {reference:.2f} | "
             f"torch pipeline is {_faster(pipeline / reference)} |")
        echo(f"| `--runtime auto --no-region-checks` then the reference loop, {len(pairs)} pairs back to back | "
             f"{', '.join(f'{run:.2f}/{loop:.2f}' for run, loop in pairs)} | median "
             f"{median(pair_ratios):.2f}x the reference loop ({', '.join(f'{r:.2f}' for r in pair_ratios)}) |")
        echo("")
        echo("| re-run with new classes, feature cache in memory | seconds | ratio | where the time goes |")
        echo("|---|---|---|---|")
        echo(f"| first run, {len(BENCH_CLASSES)} classes ({auto_name}; built beforehand in "
             f"{results['auto_encoder_build_s']:.1f} s) | {first_s:.2f} | 1.00 (baseline) | {_split(first)} |")
        echo(f"| re-run, {len(RERUN_CLASSES)} new classes typed before ({rerun.features['cached']} of "
             f"{rerun.tiles} crops cached) | {rerun_s:.2f} | {rerun_s / first_s:.3f} of the first run | "
             f"{_split(rerun)} |")
        echo(f"| re-run, {len(NEW_CLASSES)} classes never typed (their text encoded in the run) | {cold_s:.2f} | "
             f"{cold_s / first_s:.3f} of the first run | {_split(cold)} |")
        zoom_side = min(ZOOM_SIDE, size)
        echo(f"| zoomed-in re-run, a {zoom_side}x{zoom_side} part, --no-region-checks, classes typed before "
             f"({zoom.features['cached']} of {zoom.tiles} crops cached, {zoom.report['encoder']}) | {zoom_s:.2f} | "
             f"{zoom_s / first_s:.3f} of the first run | {_split(zoom)} |")
        echo(f"| the same part uncached on torch (what auto ran there before) | {zoom_torch_s:.2f} | "
             f"{zoom_torch_s / first_s:.3f} of the first run; the cached re-run is {zoom_torch_s / zoom_s:.1f}x "
             f"faster | {_split(zoom_torch)} |")
        echo(f"| first run, --no-region-checks | {plain_s:.2f} | 1.00 (baseline) | {_split(plain)} |")
        echo(f"| re-run, --no-region-checks, {len(RERUN_CLASSES)} classes typed before | {plain_rerun_s:.2f} | "
             f"{plain_rerun_s / plain_s:.3f} of its first run | {_split(plain_rerun)} |")
        cache_mb = cold.features["cache"]["memory_bytes"] / 2**20
        echo(f"| cache held {cache_mb:.0f} MiB of {cold.features['cache']['memory_max_bytes'] / 2**20:.0f}; "
             f"re-run with the first classes gives {'an identical' if identical else 'a DIFFERENT'} class "
             f"raster | | | |")

        text = bench_text(loaded, work)
        results["text"] = text
        echo("")
        echo("| text, one class query (80 prompts) | seconds | ratio |")
        echo("|---|---|---|")
        echo(f"| full {loaded.context_length}-token context | {text['full_s']:.3f} | 1.00 (baseline) |")
        echo(f"| truncated to longest prompt | {text['truncated_s']:.3f} | "
             f"{text['full_s'] / text['truncated_s']:.1f}x faster (max diff {text['max_abs_diff']:.1e}) |")
        if "shared_beginnings_s" in text:
            echo(f"| truncated, the templates' shared beginnings run once | {text['shared_beginnings_s']:.3f} | "
                 f"{text['full_s'] / text['shared_beginnings_s']:.1f}x faster; "
                 f"{text['truncated_s'] / text['shared_beginnings_s']:.1f}x the truncated prompts "
                 f"(max diff {text['shared_beginnings_max_abs_diff']:.1e}) |")
        echo(f"| cold, through TextEmbedder | {text['cold_s']:.3f} | |")
        echo(f"| cached on disk, new process state | {text['cached_s']:.4f} | "
             f"{text['cold_s'] / max(text['cached_s'], 1e-9):.0f}x faster than cold |")
        long_ctx = random_model(arch, dev, context_length=248)
        long_text = bench_text(long_ctx, work / "long")
        results["text_248"] = long_text
        echo(f"| full 248-token context (FarSLIP2) | {long_text['full_s']:.3f} | 1.00 (baseline) |")
        echo(f"| 248 truncated | {long_text['truncated_s']:.3f} | "
             f"{long_text['full_s'] / long_text['truncated_s']:.1f}x faster |")
        if "shared_beginnings_s" in long_text:
            echo(f"| 248, shared beginnings run once | {long_text['shared_beginnings_s']:.3f} | "
                 f"{long_text['full_s'] / long_text['shared_beginnings_s']:.1f}x faster |")

        if rss_sizes:
            tiny = tiny_checkpoint(work / "tiny.pt")
            echo("")
            echo("| peak RSS, tiny model, segment -> GPKG + class raster | MiB | crops | seconds |")
            echo("|---|---|---|---|")
            rss = {}
            for side in rss_sizes:
                path = write_test_raster(work / f"rss_{side}.tif", side)
                run_dir = work / f"rss_out_{side}"
                run_dir.mkdir()
                rss[side] = _rss_child(["rss", str(path), str(tiny), str(run_dir), str(batch_size)])
                echo(f"| {side}x{side} ({side * side / 1e6:.3g} Mpx) | {rss[side]['peak_rss_mb']:.0f} | "
                     f"{rss[side]['tiles']} | {rss[side]['seconds']:.1f} |")
                path.unlink()
            results["rss"] = rss
            echo(rss_ratio_line({side: figures["peak_rss_mb"] for side, figures in rss.items()}))
    return results


def _faster(ratio: float) -> str:
    """A speed ratio in words: '1.42x faster', or '1.72x slower' for a ratio under 1."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def rss_ratio_line(peaks: dict[int, float]) -> str:
    """The peak memory of the largest raster side against the smallest's ('' with fewer than two sides)."""
    sides = sorted(peaks)
    if len(sides) < 2:
        return ""
    return (f"\npeak RSS ratio {peaks[sides[-1]] / peaks[sides[0]]:.2f} for {(sides[-1] / sides[0]) ** 2:.0f}x "
            "the pixels")


def tiny_checkpoint(path: Path, patch_size: int = 16, width: int = 128, layers: int = 2) -> Path:
    """A tiny random ViT checkpoint (default: ViT-B/16-shaped, 2 layers, width 128) for memory runs."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=64, quick_gelu=True,
        vision_cfg={"image_size": 224, "patch_size": patch_size, "width": width, "layers": layers,
                    "head_width": 64},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": layers})
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    if sys.argv[1:2] == ["rss"]:
        raster, model_path, out_dir, batch = sys.argv[2:6]
        rss_run(raster, model_path, out_dir, int(batch))
    else:
        raise SystemExit("usage: python -m backend.service.bench rss RASTER MODEL OUT_DIR BATCH")
