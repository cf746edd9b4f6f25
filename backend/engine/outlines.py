"""The `--refine` step of `segment`: coarse class rasters in, refined class rasters out.

`none` passes the engine's rasters through. `edges` needs the class probabilities `halo_px()`
around the request (so the engine computes that wider window) and rewrites class, score and
probability rasters block by block. `sam` keeps the engine's window, loads the SAM model and
rewrites the class raster window by window (backend/engine/sam.py), then rescores it; its
probability raster stays the engine's (SAM gives no probabilities).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from .quality import pixel_signals
from .raster import PixelWindow, native_gsd_m
from .refine import DEFAULT_EDGES, grow_window, halo_px, refine_edges_blocks
from .sliding import label_probabilities

STRIP_ROWS = 256


@dataclass
class RefinedRasters:
    class_path: Path
    score_path: Path
    prob_path: Path | None
    coarse_class_path: Path | None = None   # the unrefined classes of the request window, to compare with
    coarse_score_path: Path | None = None
    signals_path: Path | None = None        # margin and entropy of the (refined) probabilities, when rewritten
    timings: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


def check(refine: str, sam_model: str | None) -> None:
    """Refuse now, before the engine computes a tile, what would fail once it has: for `sam`, weights that are
    missing (downloaded if need be) or that do not fit their configuration (read from the file's header)."""
    if refine == "sam":
        from .sam_models import ensure_sam_weights

        ensure_sam_weights(sam_model)


def engine_window(refine: str, source, window: PixelWindow) -> PixelWindow:
    """The window the engine must compute for `refine` to be exact on `window`."""
    if refine == "edges":
        return grow_window(window, halo_px(DEFAULT_EDGES), source.height, source.width)
    return window


def _profile_like(path: Path, source, window: PixelWindow) -> dict:
    with rasterio.open(path) as ds:
        profile = ds.profile.copy()
        tags = ds.tags(1)
        colormap = ds.colormap(1) if ds.count == 1 and ds.dtypes[0] == "uint8" else None
        descriptions = ds.descriptions
    profile.update(width=window.width, height=window.height, transform=source.window_transform(window))
    return {"profile": profile, "tags": tags, "colormap": colormap, "descriptions": descriptions}


def _create(path: Path, like: dict):
    ds = rasterio.open(path, "w", **like["profile"])
    if like["colormap"]:
        ds.write_colormap(1, like["colormap"])
    ds.update_tags(1, **like["tags"])
    for band, text in enumerate(like["descriptions"], start=1):
        if text:
            ds.set_band_description(band, text)
    return ds


def _edges(source, window, computed, workdir, class_path, score_path, prob_path, signals_path, threshold,
           should_cancel):
    """Refined class/score/probability/signal rasters of `window`, and its coarse class/score rasters."""
    like = {"class": class_path, "score": score_path, "probs": prob_path, "coarse": class_path,
            "coarse_score": score_path, "signals": signals_path}
    targets = {name: workdir / f"{name}_window.tif" for name in like}
    writers = {name: _create(path, _profile_like(like[name], source, window)) for name, path in targets.items()}
    try:
        for block, probs, coarse, valid in refine_edges_blocks(source, window, computed, prob_path,
                                                               should_cancel=should_cancel):
            target = Window(block.col_off - window.col_off, block.row_off - window.row_off, block.width, block.height)
            for (class_key, score_key), values in ((("class", "score"), probs), (("coarse", "coarse_score"), coarse)):
                class_ids, score = label_probabilities(values, valid, threshold)
                writers[class_key].write(class_ids, 1, window=target)
                writers[score_key].write(score, 1, window=target)
            writers["probs"].write(probs, window=target)
            writers["signals"].write(np.stack(pixel_signals(probs)), window=target)
    finally:
        for ds in writers.values():
            ds.close()
    return targets


def _rescore(class_path: Path, prob_path: Path, score_path: Path) -> None:
    """The score raster as the probability of each pixel's (refined) class, strip by strip."""
    with rasterio.open(class_path) as classes_ds, rasterio.open(prob_path) as probs_ds, \
            rasterio.open(score_path, "r+") as score_ds:
        for row in range(0, classes_ds.height, STRIP_ROWS):
            strip = Window(0, row, classes_ds.width, min(STRIP_ROWS, classes_ds.height - row))
            classes = classes_ds.read(1, window=strip)
            probs = probs_ds.read(window=strip)
            known = classes < probs.shape[0]
            picked = np.take_along_axis(probs, np.minimum(classes, probs.shape[0] - 1)[None].astype(np.intp), 0)[0]
            score_ds.write(np.where(known, picked, np.nan).astype(np.float32), 1, window=strip)


def _sam(sam_model, device, source, window, workdir, class_path, score_path, prob_path, threshold, should_cancel):
    from .sam import coarse_resolution_warning, refine_with_sam
    from .sam_models import load_sam

    start = time.perf_counter()
    sam = load_sam(sam_model, device)
    load_s = time.perf_counter() - start
    refined_path = workdir / "classes_sam.tif"
    shutil.copyfile(class_path, refined_path)
    shutil.copyfile(score_path, workdir / "score_coarse.tif")
    stats = refine_with_sam(sam, source, window, class_path, prob_path, refined_path, should_cancel=should_cancel,
                            threshold=threshold)
    _rescore(refined_path, prob_path, score_path)
    warning = coarse_resolution_warning(native_gsd_m(source.dataset) / source.scale, sam.image_size)
    report = {"sam": {"model": sam.name, "weights": sam.weights_path, "window": sam.image_size, **stats.summary()}}
    return refined_path, load_s, report, [warning] if warning else []


def run(refine: str, sam_model: str | None, device, source, window: PixelWindow, computed: PixelWindow,
        workdir: Path, class_path: Path, score_path: Path, prob_path: Path | None, signals_path: Path,
        threshold: float, should_cancel=None) -> RefinedRasters:
    """Refine the engine's rasters of `computed` into rasters of `window` (see the module docstring)."""
    if refine == "none":
        return RefinedRasters(class_path, score_path, prob_path, signals_path=signals_path)
    start = time.perf_counter()
    if refine == "edges":
        out = _edges(source, window, computed, workdir, class_path, score_path, prob_path, signals_path, threshold,
                     should_cancel)
        return RefinedRasters(out["class"], out["score"], out["probs"], out["coarse"], out["coarse_score"],
                              out["signals"], {"refine_s": time.perf_counter() - start},
                              {"refine": {"method": "edges", "halo_px": halo_px(DEFAULT_EDGES),
                                          "settings": DEFAULT_EDGES.__dict__}})
    assert refine == "sam"
    refined_path, load_s, report, warnings = _sam(sam_model, device, source, window, workdir, class_path, score_path,
                                                prob_path, threshold, should_cancel)
    report["refine"] = {"method": "sam"}
    return RefinedRasters(refined_path, score_path, prob_path, class_path, workdir / "score_coarse.tif",
                          signals_path, {"refine_s": time.perf_counter() - start - load_s, "sam_load_s": load_s},
                          report, warnings)
