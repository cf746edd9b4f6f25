"""Calibrate and measure the label-free quality estimate (backend/engine/quality.py) on labelled tiles.

The labelled area is cut into square tiles of the processing grid. For each tile with enough labelled
pixels, the same signals as a polygon's are computed over the tile (mean top-1 probability, margin,
entropy, sharpness on the predicted class boundaries, and the CLS region check of the tile's majority
class), and the tile's true IoU (mean over the classes present in the labels or the prediction).
`rank_agreement` then gives SROCC and PLCC between predicted quality and true IoU, the figures RS-SQA
reports. Calibration fits the logistic model on all tiles; the figures reported for it are
out-of-fold: each spatial fold (blocks of 3x3 tiles) is predicted by a model fitted on the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from backend.engine.diskspace import writing_to
from backend.engine.errors import InputError
from backend.engine.quality import (
    QualityModel,
    crop_class_probabilities,
    calibration_path_for,
    fit_quality_model,
    pixel_signals,
    rank_agreement,
)
from backend.engine.raster import PixelWindow, open_source
from backend.engine.sliding import predict_window

from .api import model_class_lines
from .evaluate import segmenter_for
from .labels import UNLABELLED, build_label_grid, read_aoi, read_label_polygons

MIN_LABELLED_SHARE = 0.5
FOLD_BLOCK = 3  # tiles per side of a spatial fold


def tile_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean IoU over the classes present in the tile's labels or its prediction (labelled pixels only)."""
    ious = []
    for value in np.union1d(np.unique(truth), np.unique(predicted)):
        t, p = truth == value, predicted == value
        union = (t | p).sum()
        if union:
            ious.append((t & p).sum() / union)
    return float(np.mean(ious)) if ious else float("nan")


def _sharpness(score: np.ndarray, class_ids: np.ndarray) -> float:
    filled = np.where(np.isfinite(score), score, 0.0)
    gy, gx = np.gradient(filled)
    edge = np.zeros(class_ids.shape, bool)
    edge[:, 1:] |= class_ids[:, 1:] != class_ids[:, :-1]
    edge[1:, :] |= class_ids[1:, :] != class_ids[:-1, :]
    return float(np.hypot(gx, gy)[edge].mean()) if edge.any() else float("nan")


def _region_agreement(loaded, segmenter, source, tiles: list[PixelWindow], majority: list[int]) -> np.ndarray:
    """The CLS region check of each tile (grown by half its size on each side) for its majority class."""
    crops = []
    for tile in tiles:
        grow = tile.height // 2
        row, col = max(tile.row_off - grow, 0), max(tile.col_off - grow, 0)
        crops.append(PixelWindow(row, col, min(tile.height + 2 * grow, source.height - row),
                                 min(tile.width + 2 * grow, source.width - col)))
    probs = crop_class_probabilities(loaded, source, crops, segmenter.text, np.asarray(segmenter.owner))
    return np.array([probs[i, c] if c >= 0 else np.nan for i, c in enumerate(majority)], dtype=float)


def tile_table(loaded, source, window: PixelWindow, truth: np.ndarray, class_lines: list[str], tile: int,
               attention: str = "segearth", batch_size: int = 8,
               should_cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signals (T, 5), true IoU (T,), tile (row, col) index (T, 2)) over the labelled `window`."""
    segmenter = segmenter_for(loaded, class_lines, attention=attention, batch_size=batch_size)
    block = predict_window(segmenter, source, window, should_cancel=should_cancel)
    assert block.probs is not None, "a new Segmenter keeps its class probabilities"
    margin, entropy = pixel_signals(block.probs)
    rows, signals, ious, tiles, majority = [], [], [], [], []
    for r in range(0, window.height - tile + 1, tile):
        for c in range(0, window.width - tile + 1, tile):
            cut = (slice(r, r + tile), slice(c, c + tile))
            labelled = (truth[cut] != UNLABELLED) & block.valid[cut]
            if labelled.mean() < MIN_LABELLED_SHARE:
                continue
            predicted = block.class_ids[cut]
            values, counts = np.unique(predicted[block.valid[cut]], return_counts=True)
            top = int(values[counts.argmax()]) if len(values) else -1
            signals.append([np.nanmean(block.score[cut][labelled]), np.nanmean(margin[cut][labelled]),
                            np.nanmean(entropy[cut][labelled]), _sharpness(block.score[cut], predicted), np.nan])
            ious.append(tile_iou(truth[cut][labelled], predicted[labelled]))
            tiles.append(PixelWindow(window.row_off + r, window.col_off + c, tile, tile))
            majority.append(top if top < len(segmenter.classes) else -1)
            rows.append((r // tile, c // tile))
    table = np.asarray(signals, float).reshape(-1, 5)
    if len(tiles):
        table[:, 4] = _region_agreement(loaded, segmenter, source, tiles, majority)
    return table, np.asarray(ious, float), np.asarray(rows, int).reshape(-1, 2)


def out_of_fold(signals: np.ndarray, truth: np.ndarray, index: np.ndarray, weights_sha256: str | None,
                class_lines: list[str]) -> np.ndarray:
    """Each spatial fold's tiles predicted by a model fitted on the other folds."""
    folds = (index[:, 0] // FOLD_BLOCK) * 10_000 + index[:, 1] // FOLD_BLOCK
    predicted = np.full(len(truth), np.nan)
    for fold in np.unique(folds):
        held = folds == fold
        if (~held).sum() < 3:
            continue
        try:
            model = fit_quality_model(signals[~held], truth[~held], weights_sha256, class_lines)
        except InputError:
            continue  # too few training tiles outside this fold
        predicted[held] = model.predict(signals[held])
    return predicted


def check_quality_tile(tile: int) -> None:
    if not 16 <= tile <= 1024:
        raise InputError(f"--quality-tile must be between 16 and 1024 pixels; got {tile}.")


def calibration_target(loaded, out: str | Path | None) -> Path:
    """Where the calibration goes: `out`, else the fine-tuned model's own folder."""
    model_dir = loaded.metadata.get("model_dir")
    if out:
        return Path(out)
    if model_dir:
        return calibration_path_for(Path(model_dir))
    raise InputError("Where should the quality calibration go? This model is not a fine-tuned model folder, "
                     "so name a file with --quality-out (e.g. --quality-out my-calibration.json).")


def calibrate_quality(raster: str | Path, labels: str | Path, class_field: str, loaded, out: str | Path | None,
                      background: str | None = None, aoi: str | Path | None = None,
                      class_names: dict[str, str] | None = None, bands: list[int] | None = None,
                      scale: float | None = None, gsd_m: float | None = None, tile: int = 64,
                      attention: str = "segearth", batch_size: int = 8,
                      should_cancel: Callable[[], bool] | None = None, square: bool = True) -> dict:
    """Measure the default estimate, fit a calibration on the tiles, store it; SROCC/PLCC of both.
    (`square`: how `gsd_m` resamples, raster.processing_scale.)"""
    target = calibration_target(loaded, out)
    check_quality_tile(tile)
    with open_source(raster, bands, scale, gsd_m, square=square) as source:
        polygons = read_label_polygons(labels, class_field, source.crs, class_names)
        # The evaluation's own classes: the model's when it knows every label class, else the label values
        # (and the background class).
        lines = model_class_lines(loaded, set(polygons.class_values), background)
        area = read_aoi(aoi, source.crs) if aoi else None
        grid = build_label_grid(source, polygons, background=background, aoi=area, class_lines=lines)
        signals, truth, index = tile_table(loaded, source, grid.window, grid.labels, grid.class_lines, tile,
                                           attention, batch_size, should_cancel)
    default = rank_agreement(QualityModel().predict(signals), truth) if len(truth) else {}
    model = fit_quality_model(signals, truth, loaded.weights_id, grid.class_lines)
    held_out = rank_agreement(out_of_fold(signals, truth, index, loaded.weights_id, grid.class_lines), truth)
    model.metrics = {"tiles": len(truth), "tile_px": tile, "default": default, "out_of_fold": held_out,
                     "raster": str(raster), "labels": str(labels)}
    with writing_to([target], 1.0):
        model.save(target)
    return {"calibration": str(target), "tiles": len(truth), "default": default, "calibrated": held_out,
            "class_lines": grid.class_lines}
