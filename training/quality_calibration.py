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

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from backend.engine.atomic import StagedOutputs
from backend.engine.diskspace import writing_to
from backend.engine.errors import InputError
from backend.engine.files import absolute_raster_name
from backend.engine.quality import (
    QualityModel,
    calibration_path_for,
    crop_class_probabilities,
    fit_quality_model,
    pixel_signals,
    rank_agreement,
)
from backend.engine.raster import PixelWindow, open_source
from backend.engine.sliding import predict_window

from .api import model_class_lines
from .evaluate import predict_with_retries, segmenter_for
from .labels import UNLABELLED, build_label_grid, raster_envelope, read_aoi, read_label_polygons
from .run_checks import check_quality_tile

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
               attention: str = "segearth", batch_size: int | None = None,
               should_cancel: Callable[[], bool] | None = None,
               notice: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signals (T, 5), true IoU (T,), tile (row, col) index (T, 2)) over the labelled `window`. Batches of
    `batch_size` crops (default: as segment picks it); on a GPU that runs out of memory in a batch, again with half
    the batch, `notice` hearing one sentence per retry (evaluate.predict_with_retries)."""
    segmenter = segmenter_for(loaded, class_lines, attention=attention, batch_size=batch_size)
    block = predict_with_retries(segmenter, lambda: predict_window(segmenter, source, window,
                                                                   should_cancel=should_cancel), notice)
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


def calibration_target(loaded, out: str | Path | None) -> Path:
    """Where the calibration goes: `out`, else the fine-tuned model's own folder."""
    model_dir = loaded.metadata.get("model_dir")
    if out:
        return Path(out)
    if model_dir:
        return calibration_path_for(Path(model_dir))
    raise InputError("Where should the quality calibration go? This model is not a fine-tuned model folder, "
                     "so name a file with --quality-out (e.g. --quality-out my-calibration.json).")


# A new calibration is written only when it ranks the labelled tiles (SROCC with the tiles' true IoU, then PLCC)
# at least as well as the built-in estimate and as the calibration it would replace, on the same tiles: the new
# one on spatially held-out tiles (each fold predicted by a model fitted on the others), the built-in and the
# existing one, not fitted on them, on all. Otherwise the better estimate is kept and the run says so;
# --force-calibration writes the new one anyway.

FORCE_FLAG = "--force-calibration"
NAMES = {"new": "the new calibration", "existing": "the existing calibration", "default": "the built-in estimate"}


def ranks_worse(a: dict, b: dict) -> bool:
    """Whether the estimate scored `a` ranks the tiles worse than the one scored `b`: lower SROCC, or the same
    SROCC and lower PLCC. A figure that could not be measured (NaN: too few or constant tiles) decides nothing."""
    for key in ("srocc", "plcc"):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or math.isnan(x) or math.isnan(y):
            return False
        if x != y:
            return x < y
    return False


def scored(score: dict) -> bool:
    """Whether an estimate's ranking of the tiles could be measured (SROCC and PLCC are numbers, not NaN)."""
    return all(isinstance(score.get(key), (int, float)) and math.isfinite(score[key]) for key in ("srocc", "plcc"))


def choose(scores: dict[str, dict]) -> str:
    """Which estimate to keep of `scores` ({"new": ..., "default": ..., "existing": ... when there is one}):
    the new calibration unless another ranks the tiles better, or its own ranking could not be measured (it is
    then not known to rank them at least as well); else the best of the others, one whose ranking was measured
    before one whose ranking was not (the existing calibration before the built-in estimate when they tie)."""
    others = [name for name in ("existing", "default") if name in scores]
    if scored(scores["new"]) and not any(ranks_worse(scores["new"], scores[name]) for name in others):
        return "new"
    best = others[0]
    for name in others[1:]:
        if ranks_worse(scores[best], scores[name]) or (not scored(scores[best]) and scored(scores[name])):
            best = name
    return best


def _figure(value) -> str:
    return f"{value}" if isinstance(value, (int, float)) and math.isfinite(value) else "not measurable"


def figures_text(score: dict) -> str:
    """An estimate's SROCC and PLCC as a run prints them ("not measurable" for a figure that is NaN or null)."""
    return f"SROCC {_figure(score.get('srocc'))}, PLCC {_figure(score.get('plcc'))}"


def unscored_reason(truth: np.ndarray, held_out: np.ndarray) -> str:
    """Why the new calibration's ranking of the tiles could not be measured, in plain words."""
    known = np.isfinite(truth)
    if known.sum() >= 3 and np.ptp(truth[known]) == 0:
        return (f"all {int(known.sum())} labelled tiles have the same true IoU ({100 * float(truth[known][0]):.2f} %), "
                "so there is no ranking of them to check")
    ok = known & np.isfinite(held_out)
    if ok.sum() < 3:
        return (f"only {int(ok.sum())} of the {len(truth)} labelled tiles could be predicted by a calibration "
                "fitted on the other tiles (3 are needed); label a larger area or use a smaller --quality-tile")
    return "its predictions for the held-out tiles are all the same, so they rank nothing"


def verdict(kept: str, scores: dict[str, dict], target: Path, forced: bool, unscored: str | None = None) -> str:
    """The one sentence that says which estimate was kept, and why (`unscored`: why the new calibration's
    ranking could not be measured, when it could not)."""
    new = scores["new"]
    if unscored is not None:
        reason = f"The new calibration could not be scored: {unscored}"
        if forced:
            return f"{reason}; written to {target} anyway, as {FORCE_FLAG} asks."
        if kept == "existing":
            return f"{reason}. {target} was kept as it was; add {FORCE_FLAG} to replace it anyway."
        if "existing" in scores:
            existing = (f"which ranks the tiles worse than the built-in estimate ({figures_text(scores['existing'])} "
                        f"against {figures_text(scores['default'])})" if scored(scores["existing"]) else
                        "whose ranking of the tiles could not be measured either")
            return (f"{reason}. Nothing was written; {target}, {existing}, was left as it was: delete it to use the "
                    f"built-in estimate, or add {FORCE_FLAG} to replace it with the new one.")
        return (f"{reason}. Nothing was written and segment keeps using the built-in estimate; add {FORCE_FLAG} to "
                "write the new one anyway.")
    if forced:
        worse = next(name for name in ("existing", "default") if name in scores and ranks_worse(new, scores[name]))
        return (f"The new calibration ranks the tiles worse than {NAMES[worse]} ({figures_text(new)} against "
                f"{figures_text(scores[worse])}); written to {target} anyway, as {FORCE_FLAG} asks.")
    if kept == "new":
        return f"Calibration written to {target}."
    reason = (f"The new calibration ranks the tiles worse ({figures_text(new)} on held-out tiles) than {NAMES[kept]} "
              f"({figures_text(scores[kept])})")
    if kept == "existing":
        return f"{reason}, so {target} was kept as it was; add {FORCE_FLAG} to replace it anyway."
    if "existing" in scores:
        existing = (f"which ranks them worse too ({figures_text(scores['existing'])})" if scored(scores["existing"])
                    else "whose ranking of them could not be measured")
        return (f"{reason}, so nothing was written; {target}, {existing}, was left as it was: delete it to use the "
                f"built-in estimate, or add {FORCE_FLAG} to replace it with the new one.")
    return (f"{reason}, so nothing was written and segment keeps using the built-in estimate; add {FORCE_FLAG} "
            "to write it anyway.")


def _fitted_on(metrics: dict, fitted_on: dict) -> bool:
    """Whether a calibration's recorded metrics say it was fitted on the tiles `fitted_on` describes, with
    held-out figures recorded."""
    if not isinstance(metrics.get("out_of_fold"), dict) or "srocc" not in metrics["out_of_fold"]:
        return False
    try:
        recorded = {"raster": absolute_raster_name(str(metrics.get("raster"))),
                    "labels": str(Path(str(metrics.get("labels"))).resolve()),
                    "tile_px": metrics.get("tile_px"), "tiles": metrics.get("tiles")}
    except (OSError, ValueError):
        return False
    return recorded == fitted_on


def _existing(target: Path, weights_id: str | None, class_lines: list[str]) -> tuple[QualityModel | None, str | None]:
    """The calibration already at `target` when it fits this model and class list; else (None, why not)."""
    if not target.is_file():
        return None, None
    try:
        return QualityModel.load(target, weights_id, class_lines), None
    except InputError as error:  # another model's or class list's, or not a calibration: replaced, not compared
        return None, str(error)


def calibrate_and_keep_the_better(raster: str | Path, labels: str | Path, class_field: str, loaded,
                                  out: str | Path | None, force: bool = False, background: str | None = None,
                                  aoi: str | Path | None = None, class_names: dict[str, str] | None = None,
                                  bands: list[int] | None = None, scale: float | None = None,
                                  gsd_m: float | None = None, tile: int = 64, attention: str = "segearth",
                                  batch_size: int | None = None, should_cancel: Callable[[], bool] | None = None,
                                  square: bool = True,
                                  along: Mapping[str | Path, Callable[[Path, dict], object]] | None = None,
                                  may_replace: bool = True) -> dict:
    """Fit a calibration on the labelled tiles and store it only when it ranks the tiles at least as well as
    the built-in estimate and the calibration already at its place (or when `force`). Returns the figures,
    which estimate was kept and the sentence saying so. (`square`: how `gsd_m` resamples,
    raster.processing_scale.)

    `along`: other files that land with the calibration, in one commit, all or nothing (a run's PNG and its
    report, which records the figures): each is written by its function, given the file's staged name and the
    figures returned, and renamed in after the calibration, in the order given (the report last).

    A calibration already at the target that was fitted on these very tiles is compared by the held-out
    figures it recorded then (scored on them again it would be judged on the tiles it was fitted on); without
    `may_replace` (the CLI's --overwrite) a file at the target is never replaced, and the sentence says so.
    The figures' `file_at_target` says what the target holds afterwards: "new", "existing" or "none"."""
    target = calibration_target(loaded, out)
    check_quality_tile(tile)
    with open_source(raster, bands, scale, gsd_m, square=square, task="calibrate the quality estimate on") as source:
        polygons = read_label_polygons(labels, class_field, source.crs, class_names, raster_envelope(source))
        lines = model_class_lines(loaded, set(polygons.class_values), background)
        area = read_aoi(aoi, source.crs, raster_envelope(source)) if aoi else None
        grid = build_label_grid(source, polygons, background=background, aoi=area, class_lines=lines)
        signals, truth, index = tile_table(loaded, source, grid.window, grid.labels, grid.class_lines,
                                                   tile, attention, batch_size, should_cancel)
    model = fit_quality_model(signals, truth, loaded.weights_id, grid.class_lines)
    held_out = out_of_fold(signals, truth, index, loaded.weights_id, grid.class_lines)
    scores = {"new": rank_agreement(held_out, truth), "default": rank_agreement(QualityModel().predict(signals), truth)}
    fitted_on = {"raster": absolute_raster_name(raster), "labels": str(Path(labels).resolve()), "tile_px": tile,
                 "tiles": len(truth)}
    existing, unusable = _existing(target, loaded.weights_id, grid.class_lines)
    existing_held_out = existing is not None and _fitted_on(existing.metrics, fitted_on)
    if existing is not None:
        scores["existing"] = (dict(existing.metrics["out_of_fold"]) if existing_held_out else
                              rank_agreement(existing.predict(signals), truth))
    best = choose(scores)
    kept = "new" if force else best
    unscored = None if scored(scores["new"]) else unscored_reason(truth, held_out)
    sentence = verdict(kept, scores, target, forced=force and best != "new", unscored=unscored)
    if kept == "new" and target.exists() and not may_replace:  # a file there stays without --overwrite
        kept = "existing"
        sentence = (f"The new calibration ({figures_text(scores['new'])} on held-out tiles) would replace {target}, "
                    "which exists and was left as it was: add --overwrite to replace it.")
    written = kept == "new"
    fit = {"calibration": str(target), "written": written, "kept": kept, "forced": force and best != "new",
           "file_at_target": "new" if written else ("existing" if target.is_file() else "none"),
           "tiles": len(truth), "default": scores["default"], "calibrated": scores["new"],
           "existing": scores.get("existing"), "existing_scored": (
               None if existing is None else "held out, as recorded when it was fitted on these tiles"
               if existing_held_out else "on these tiles"),
           "existing_not_comparable": unusable, "class_lines": grid.class_lines, "sentence": sentence}
    writers = list((along or {}).values())
    outputs = {**({"calibration": target} if written else {}),
               **{f"along {i}": Path(path) for i, path in enumerate(along or {})}}
    if not outputs:
        return fit
    # The calibration first, the files along with it after it (the report last), renamed in together.
    with StagedOutputs(outputs) as staged, writing_to(outputs.values(), 1.0):
        if written:
            model.metrics = {**fitted_on, "default": scores["default"], "out_of_fold": scores["new"],
                             **({"replaced": scores["existing"]} if "existing" in scores else {})}
            model.save(staged["calibration"])
        for i, write in enumerate(writers):
            write(staged[f"along {i}"], fit)
        staged.commit()
    return fit
