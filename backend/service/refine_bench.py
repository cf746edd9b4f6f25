"""`farslip bench --refine`: how much sharper outlines get, and what refinement costs.

Quality is measured without model weights, so it isolates the refinement: the ground truth of a
labelled scene is coarsened to the 16-px patch grid and bilinearly upsampled (exactly what patch
logits give the engine), then refined with the image. mIoU and boundary F-score (2-px tolerance)
against the ground truth, before and after. Scenes: the solaris buildings raster and its labels
(../shared/data) and synthetic scenes drawn here (fields, roofs and roads, a nodata collar).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.features
import torch
import torch.nn.functional as F

from backend.engine.raster import PixelWindow, open_source
from backend.engine.refine import DEFAULT_EDGES, EdgeSettings, refine_edges
from training.evaluate import boundary_f_score, confusion_matrix, metrics_from_confusion

PATCH = 16


@dataclass
class Scene:
    name: str
    rgb: np.ndarray     # (3, H, W) float32, 0..255
    truth: np.ndarray   # (H, W) class ids
    valid: np.ndarray   # (H, W) bool
    num_classes: int


def coarse_probabilities(truth: np.ndarray, valid: np.ndarray, num_classes: int, patch: int = PATCH) -> np.ndarray:
    """One-hot truth averaged over the patch grid and bilinearly upsampled: what patch logits can say."""
    height, width = truth.shape
    padded = (-(-height // patch) * patch, -(-width // patch) * patch)
    one_hot = torch.zeros((1, num_classes, *padded))
    weight = torch.zeros((1, 1, *padded))
    for class_id in range(num_classes):
        one_hot[0, class_id, :height, :width] = torch.from_numpy((truth == class_id) & valid)
    weight[0, 0, :height, :width] = torch.from_numpy(valid)
    share = F.avg_pool2d(one_hot, patch) / F.avg_pool2d(weight, patch).clamp(min=1e-6)
    share = torch.where(F.avg_pool2d(weight, patch) > 0, share, 1.0 / num_classes)
    probs = F.interpolate(share, size=padded, mode="bilinear", align_corners=False)[0, :, :height, :width].numpy()
    probs[:, ~valid] = np.nan
    return probs


def scene_scores(scene: Scene, probs: np.ndarray) -> dict:
    predicted = np.where(scene.valid, np.nan_to_num(probs, nan=0.0).argmax(axis=0), -1)
    truth = np.where(scene.valid, scene.truth, -1)
    confusion = confusion_matrix(truth, predicted, scene.num_classes)
    miou = metrics_from_confusion(confusion, [str(i) for i in range(scene.num_classes)])["miou"]
    return {"miou": miou, "boundary_f": boundary_f_score(scene.truth, predicted, scene.valid, scene.num_classes)}


def nodata_respected(scene: Scene, refined: np.ndarray, settings: EdgeSettings) -> bool:
    """Masked pixels stay masked, and what lies under the mask does not change any valid pixel."""
    if scene.valid.all():
        return True
    scrambled = scene.rgb.copy()
    scrambled[:, ~scene.valid] = np.random.default_rng(1).uniform(0, 255, (3, int((~scene.valid).sum())))
    again = refine_edges(coarse_probabilities(scene.truth, scene.valid, scene.num_classes), scrambled,
                         scene.valid, settings)
    stays_masked = bool(np.isnan(refined[:, ~scene.valid]).all())
    return stays_masked and bool((again.argmax(axis=0) == refined.argmax(axis=0))[scene.valid].all())


def measure_scene(scene: Scene, settings: EdgeSettings = DEFAULT_EDGES) -> dict:
    coarse = coarse_probabilities(scene.truth, scene.valid, scene.num_classes)
    start = time.perf_counter()
    refined = refine_edges(coarse, scene.rgb, scene.valid, settings)
    seconds = time.perf_counter() - start
    before, after = scene_scores(scene, coarse), scene_scores(scene, refined)
    return {"scene": scene.name, "pixels": int(scene.valid.size), "classes": scene.num_classes,
            "before": before, "after": after, "seconds": seconds,
            "raised_both": after["miou"] > before["miou"] and after["boundary_f"] > before["boundary_f"],
            "nodata_respected": nodata_respected(scene, refined, settings)}


# --------------------------------------------------------------------------- scenes


def solaris_scene(data_dir: Path) -> Scene:
    """The solaris panchromatic suburb (0.5 m) with its building footprints: buildings vs the rest."""
    raster = data_dir / "solaris_sample_geotiff.tif"
    with open_source(raster) as source:
        rgb, valid = source.read(PixelWindow(0, 0, source.height, source.width))
        transform, shape = source.transform, (source.height, source.width)
    features = json.loads((data_dir / "solaris_geotiff_labels.geojson").read_text(encoding="utf-8"))["features"]
    truth = rasterio.features.rasterize([(f["geometry"], 1) for f in features], out_shape=shape,
                                        transform=transform, dtype="uint8")
    return Scene("solaris buildings (0.5 m, pan)", rgb, truth, valid, 2)


def _noisy(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.float32)


def fields_scene(seed: int = 0, size: int = 512, collar: bool = False) -> Scene:
    """Voronoi fields of four land covers with per-field tone, crop rows and noise (optionally a nodata collar)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, size, (24, 2))
    cover = rng.integers(0, 4, len(seeds))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    nearest = np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for y, x in seeds], axis=0)
    truth = cover[nearest].astype(np.uint8)
    palette = np.array([[70, 110, 60], [150, 130, 90], [110, 150, 70], [60, 80, 120]], np.float32)
    tone = rng.uniform(0.8, 1.2, len(seeds))[nearest]
    rgb = palette[truth].transpose(2, 0, 1) * tone[None]
    rows = (truth == 1) & (np.sin((xx + yy) / 3.0) > 0.6)
    rgb[:, rows] *= 0.85
    valid = np.ones((size, size), bool)
    name = "synthetic fields (4 classes)"
    if collar:
        # A rotated footprint, as Landsat scenes have: outside it is nodata.
        centre = size / 2
        u = (xx - centre) * np.cos(0.4) + (yy - centre) * np.sin(0.4)
        v = -(xx - centre) * np.sin(0.4) + (yy - centre) * np.cos(0.4)
        valid = (np.abs(u) < size * 0.36) & (np.abs(v) < size * 0.42)
        name = "synthetic fields, rotated nodata collar"
    return Scene(name, _noisy(rgb, rng, 10.0), truth, valid, 4)


def roofs_scene(seed: int = 1, size: int = 512) -> Scene:
    """Rotated roofs (with a ridge and a shadow side) and roads on textured grass: ground, building, road."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    truth = np.zeros((size, size), np.uint8)
    rgb = np.empty((3, size, size), np.float32)
    grass = 90 + 25 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
    rgb[:] = np.stack([grass * 0.8, grass * 1.2, grass * 0.6])
    for _ in range(3):  # roads: straight strips 10-20 px wide
        angle, offset, width = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8) * size, rng.uniform(10, 20)
        distance = np.abs((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle) - offset + size / 2)
        road = distance < width / 2
        truth[road] = 2
        rgb[:, road] = 150
    for _ in range(14):  # roofs: rotated rectangles 18-60 px, a ridge line and a shadowed half
        cy, cx = rng.uniform(30, size - 30, 2)
        half_h, half_w, angle = rng.uniform(9, 30), rng.uniform(9, 30), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        roof = (np.abs(u) < half_w) & (np.abs(v) < half_h)
        colour = rng.choice([[170, 70, 60], [120, 120, 130], [200, 190, 170]]).astype(np.float32)
        truth[roof] = 1
        rgb[:, roof] = colour[:, None]
        rgb[:, roof & (v < 0)] *= 0.8
        rgb[:, roof & (np.abs(v) < 1.5)] *= 0.6
    return Scene("synthetic roofs and roads (3 classes)", _noisy(rgb, rng, 8.0), truth,
                 np.ones((size, size), bool), 3)


def measured_scenes(data_dir: Path | None) -> list[Scene]:
    scenes = [fields_scene(), roofs_scene(), fields_scene(seed=2, collar=True)]
    if data_dir is not None and (data_dir / "solaris_sample_geotiff.tif").is_file():
        scenes.insert(0, solaris_scene(data_dir))
    return scenes


def quality_table(results: list[dict]) -> list[str]:
    lines = ["| scene | mIoU before | mIoU after | boundary F before | boundary F after | both raised | "
             "nodata respected |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['scene']} | {r['before']['miou']:.4f} | {r['after']['miou']:.4f} | "
                     f"{r['before']['boundary_f']:.4f} | {r['after']['boundary_f']:.4f} | "
                     f"{'yes' if r['raised_both'] else 'NO'} | {'yes' if r['nodata_respected'] else 'NO'} |")
    return lines


# --------------------------------------------------------------------------- cost


def _segment_seconds(raster: Path, loaded, refine: str, work: Path, batch_size: int,
                     sam_model: str | None = None) -> dict:
    from backend.engine.options import SegmentOptions
    from backend.engine.segment import segment_raster

    out = work / f"refine_{refine}.gpkg"
    options = SegmentOptions(raster=Path(raster), class_lines=BENCH_CLASSES, batch_size=batch_size, refine=refine,
                             sam_model=sam_model, out=out, overwrite=True)
    result = segment_raster(options, loaded)
    timings = dict(result.timings)
    timings["run_s"] = timings["total_s"] - timings.get("text_s", 0.0) - timings.get("sam_load_s", 0.0)
    timings["polygons"] = sum(c["polygons"] for c in result.classes)
    timings["sam"] = result.report.get("sam")
    return timings


BENCH_CLASSES = ["water, lake", "cropland, bare field", "grassland", "road", "building, roof"]


def random_sam_folder(folder: Path) -> Path:
    """A randomly initialised SAM ViT-B (transformers' default configuration) saved as a model folder:
    speed only, like the random CLIP models of `farslip bench`."""
    from transformers import SamConfig, SamModel

    torch.manual_seed(0)
    SamModel(SamConfig()).eval().save_pretrained(folder)
    return folder


def run_refine_bench(arch: str = "ViT-B-16", batch_size: int = 8, size: int = 1024, device: str = "cpu",
                     data_dir: Path | None = None, sam_model: str | None = None, with_sam: bool = True,
                     echo=print) -> dict:
    from backend.service.bench import random_model, write_test_raster

    results: dict = {"arch": arch, "device": device, "size": size, "threads": torch.get_num_threads()}
    echo("# farslip bench --refine: outline quality without weights (coarsened ground truth), then cost")
    echo("")
    quality = [measure_scene(scene) for scene in measured_scenes(data_dir)]
    results["quality"] = quality
    for line in quality_table(quality):
        echo(line)
    echo(f"\nrefinement: local colour models, radius {DEFAULT_EDGES.radius} px, {DEFAULT_EDGES.guide} guide, "
         f"halo {DEFAULT_EDGES.radius} px")

    import tempfile

    loaded = random_model(arch, torch.device(device))
    with tempfile.TemporaryDirectory(prefix="farslip-bench-refine-") as tmp:
        work = Path(tmp)
        raster = write_test_raster(work / f"bench_{size}.tif", size)
        runs = {"none": _segment_seconds(raster, loaded, "none", work, batch_size),
                "edges": _segment_seconds(raster, loaded, "edges", work, batch_size)}
        if with_sam:
            sam = sam_model or str(random_sam_folder(work / "random-sam-vit-b"))
            runs["sam"] = _segment_seconds(raster, loaded, "sam", work, batch_size, sam)
    results["runs"] = runs
    base = runs["none"]["run_s"]
    echo("")
    echo(f"| {size}x{size} GeoTIFF, {arch} (random weights), {device} | run s | refine s | "
         "refine share of the segment run |")
    echo("|---|---|---|---|")
    echo(f"| segment, --refine none | {base:.2f} | - | 0 % (baseline) |")
    for name in [n for n in ("edges", "sam") if n in runs]:
        run = runs[name]
        echo(f"| segment, --refine {name} | {run['run_s']:.2f} | {run['refine_s']:.2f} | "
             f"{100 * run['refine_s'] / base:.1f} % |")
    if "sam" in runs and runs["sam"]["sam"]:
        sam_stats = runs["sam"]["sam"]
        echo("")
        echo("| SAM | value |")
        echo("|---|---|")
        echo(f"| model | {sam_stats['model']} ({sam_stats['window']}-px windows) |")
        echo(f"| windows / objects prompted / kept / dropped | {sam_stats['windows']} / {sam_stats['prompts']} / "
             f"{sam_stats['kept']} / {sam_stats['dropped']} |")
        embed, decode = sam_stats["embed_s_per_window"], sam_stats["decode_s_per_object"]
        echo(f"| image embedding per window | {embed:.2f} s |" if embed is not None else "| no window embedded | |")
        echo(f"| mask decoding per object | {decode * 1000:.1f} ms |" if decode is not None else "| no object | |")
    return results
