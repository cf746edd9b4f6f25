"""Entry points for the CLI and the server: plain values in, plain dicts out.

    evaluate_model(raster, labels, class_field, ...) -> {"metrics", "text", "split", "outputs", ...}
    train_model(raster, labels, class_field, out, ...) -> {"model_dir", "metrics", "history", ...}

Both take `progress(step, total, info: dict)` and `should_cancel() -> bool` callbacks.
A trained model is written into a hidden `.NAME.partial` folder beside `out`
and renamed into place at the end: a failed or cancelled run leaves no model
directory. A run that fails after at least one epoch keeps its partial folder
(and says so) so that `resume=True` continues from its last epoch; a cancelled
run removes it. A run whose loss or weights stop being finite numbers stops at that step
(TrainingDiverged) and keeps only its last finished epoch, never to be trained on with the same --lr.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from backend import __version__
from backend.engine.atomic import StagedOutputs, atomic_output
from backend.engine.devices import SEGMENT_FLAGS, resolve_device
from backend.engine.diskspace import writing_to
from backend.engine.errors import CancelledError, InputError, ModelError
from backend.engine.feature_cache import raster_reads
from backend.engine.files import (
    absolute_outputs,
    absolute_raster_name,
    check_raster_name,
    check_vector_source,
    raster_label,
    raster_name,
)
from backend.engine.finetuned import (
    FINETUNED_FORMAT,
    FINETUNED_META,
    FINETUNED_WEIGHTS,
    bands_for,
    trained_resolution,
)
from backend.engine.memory import peak_rss_mb
from backend.engine.models import LoadedModel
from backend.engine.raster import PixelWindow, RasterSource, native_gsd_m, open_source, select_bands
from backend.engine.weights import file_sha256

from . import adapters
from .distill import BOX_AREA, BOX_ASPECT
from .evaluate import (
    draw_confusion,
    format_metrics,
    json_text,
    note_on_stderr,
    plot_confusion,
    predict_classes,
    score,
    segmenter_for,
    write_json,
)
from .finetune import (
    REGION_PROMPT,
    Trainer,
    TrainingData,
    TrainingDiverged,
    TrainOptions,
    TrainState,
    crop_size,
    default_steps,
    run_epochs,
)
from .labels import (
    LabelGrid,
    aoi_layer,
    build_label_grid,
    check_background,
    check_class_names,
    label_layer,
    raster_envelope,
    read_aoi,
    read_label_polygons,
    split_layer,
    vector_file,
)
from .model_folder import (
    CHECKPOINT_DIR,
    check_out_folder,
    check_resumable,
    copy_text_tower,
    load_tensors,
    move_into_place,
    out_folder,
    partial_dir,
    save_tensors,
    start_work_folder,
)
from .run_checks import (  # torch-free; their names stay importable from here
    RESUMED_OPTIONS,
    CheckedTraining,
    Progress,
    as_base_model,
    check_base_model,
    check_attention,
    check_evaluation,
    check_report_outputs,
    evaluation_inputs,
    prepare_training,
    run_options,
    training_inputs,
)
from .sampling import split_labels

TRAIN_TASK = "train on"  # what an all-nodata raster leaves nothing to (raster.open_source's sentence)
MAX_TRAINING_PIXELS = 64_000_000  # the labelled window is held in memory as float32 RGB (~770 MB)


def _load(model: str | None, weights: str | None, device: str, loaded: LoadedModel | None = None):
    if loaded is not None:
        return loaded
    from backend.engine.models import load_model

    try:
        return load_model(model, weights, device=device)
    except ModelError as error:
        raise as_base_model(error) from error


def label_grid_for(source: RasterSource, labels: str | Path, class_field: str, background: str | None,
                aoi: str | Path | None, class_names: dict[str, str] | None,
                class_lines: list[str] | None = None) -> LabelGrid:
    polygons = read_label_polygons(labels, class_field, source.crs, class_names, raster_envelope(source))
    area = read_aoi(aoi, source.crs, raster_envelope(source)) if aoi else None
    return build_label_grid(source, polygons, background=background, aoi=area, class_lines=class_lines)


def model_class_lines(loaded: LoadedModel, polygons_values: set[str], background: str | None) -> list[str] | None:
    """The model's own class order when it knows every label class (a fine-tuned model)."""
    lines = getattr(loaded, "class_lines", None)
    if not lines:
        return None
    from backend.engine.presets import parse_class_lines

    names = {spec.name.lower() for spec in parse_class_lines(lines)} | {line.lower() for line in lines}
    wanted = {v.lower() for v in polygons_values} | ({background.lower()} if background else set())
    return list(lines) if wanted <= names else None


def _same_grid(scale: float | None, gsd_m: float | None, processing: dict) -> bool:
    """Whether --scale/--gsd as given (None: left out) put the raster on the grid the training recorded."""
    if scale is None and gsd_m is None:
        return True
    if gsd_m is not None:
        return processing.get("gsd_m") is not None and math.isclose(gsd_m, float(processing["gsd_m"]), rel_tol=1e-9)
    return (scale is not None and processing.get("scale_y") is None
            and math.isclose(scale, float(processing.get("scale") or 1.0), rel_tol=1e-9))


def _resolution_given(scale: float | None, gsd_m: float | None) -> str:
    return f"--gsd {gsd_m:g}" if gsd_m is not None else f"--scale {scale:g}"


def report_outputs(out_json: str | Path | None, out_png: str | Path | None) -> dict[str, str]:
    """The report's `outputs`: the --json and --png files given."""
    return absolute_outputs({name: path for name, path in (("json", out_json), ("png", out_png)) if path})


def report_title(result: dict) -> str:
    """The confusion picture's title of an evaluation's result."""
    return f"{result['model']}: mIoU {100 * (result['metrics']['miou'] or 0):.2f} %"


def write_report_png(result: dict, path: Path, title: str) -> None:
    draw_confusion(result["metrics"], path, title)


def write_report_json(result: dict, outputs: dict[str, str], path: Path, extra: dict | None = None) -> None:
    """The metrics JSON: the result without its text, with its `outputs` (and `extra` keys)."""
    report = {k: v for k, v in {**result, "outputs": outputs}.items() if k != "text"}
    report.update(extra or {})
    path.write_text(json_text(report), encoding="utf-8")


def write_report(result: dict, out_json: str | Path | None, out_png: str | Path | None,
                 title: str) -> dict[str, str]:
    """The metrics JSON and the confusion matrix PNG, both or neither: staged, then renamed in together, the
    PNG first and the JSON (the report) last, a failed rename undoing the other (StagedOutputs); a failed
    write is a sentence naming the file."""
    outputs = report_outputs(out_json, out_png)
    with StagedOutputs({name: outputs[name] for name in ("png", "json") if name in outputs}) as staged, \
            writing_to([Path(p) for p in outputs.values()], 1.0):
        if out_png:
            write_report_png(result, staged["png"], title)
        if out_json:
            write_report_json(result, outputs, staged["json"])
        staged.commit()
    return outputs


def _give_its_own(what: str, path: str | None) -> str:
    """The end of a sentence that the model's own raster or labels were not given: which file to give, if known."""
    return f" (give its own {what}, {path}, to score the held-out strip)." if path else "."


def evaluate_model(raster: str | Path, labels: str | Path, class_field: str, model: str | None = None,
                   weights: str | None = None, background: str | None = None, aoi: str | Path | None = None,
                   class_names: dict[str, str] | None = None, split: str = "auto",
                   bands: list[int] | None = None, scale: float | None = None, gsd_m: float | None = None,
                   attention: str = "segearth", batch_size: int | None = None, device: str = "cpu",
                   out_json: str | Path | None = None, out_png: str | Path | None = None,
                   loaded: LoadedModel | None = None, progress: Progress | None = None,
                   should_cancel: Callable[[], bool] | None = None, overwrite: bool = True,
                   notice: Callable[[str], None] | None = None, flags: Collection[str] = SEGMENT_FLAGS) -> dict:
    """Per-class IoU, mIoU, accuracy and confusion of the engine's classes against labelled polygons.

    Crops run in batches of `batch_size` (default: as segment picks it, 8 on the CPU and from the free memory on
    a GPU); a batch that runs out of GPU memory runs again at half the size (predict_classes), one sentence per
    retry among the result's warnings, said as it happens to `notice` (a job's message; default: a warning through
    `progress`, else a note on stderr); the result's `batch_size` is the one that ran. The sentence when not even
    one crop fits names only the options among `flags` (the caller's: a job has none of the command's).

    split: "all" (every labelled pixel), "validation" (the held-out strip recorded in a
    fine-tuned model trained on these same files) or "auto" (validation when it applies).
    `overwrite=False` refuses report files that exist (the CLI without --overwrite); a job's caller
    (QGIS) has asked before replacing its file.
    """
    check_evaluation(model, weights, background, class_names, split)
    check_attention(attention)
    raster = raster_name(raster)  # a GDAL name as typed (a pathlib.Path folds /vsizip//abs's '//')
    check_report_outputs({"--json file": out_json, "--png file": out_png},
                         evaluation_inputs(raster, labels, aoi, model, weights), overwrite)
    label_layer(labels, class_field)  # a missing field is said before the model loads (or asks for weights)
    loaded = _load(model, weights, device, loaded)
    trained_on = (getattr(loaded, "metadata", None) or {}).get("finetuned") or {}
    same_data = same_labels = False
    if trained_on.get("data"):
        recorded = trained_on["data"]
        same_labels = (recorded.get("labels", {}).get("sha256") == file_sha256(vector_file(labels))
                       and _same_labels_layer(recorded.get("labels", {}), labels, class_field))
        same_data = (split != "all" and same_labels
                     and same_raster(recorded.get("raster") or {}, raster_record(raster)))
    # The sentence when the model's own raster comes with labels it cannot tell are its own, or its own labels
    # with a raster it cannot tell is its own: either way the held-out strip is not known, and the pixels scored
    # may be those it was trained on.
    unmatched = []
    if split == "auto" and same_labels and not same_data:
        trained_raster = (trained_on["data"].get("raster") or {}).get("path")
        unmatched = ["These are the labels the model was trained on, but this raster cannot be matched to the one it "
                     "was trained on (the file's sha256, or the raster's name in its archive or container, differs "
                     "from the model's farslip_model.json; a re-saved copy counts as another file), so its held-out "
                     "strip is not known here: scored on all labelled pixels, the polygons it was trained on included"
                     + _give_its_own("raster", trained_raster)]
    elif (split == "auto" and trained_on.get("data") and not same_labels
            and same_raster(trained_on["data"].get("raster") or {}, raster_record(raster))):
        trained_labels = (trained_on["data"].get("labels") or {}).get("path")
        unmatched = ["The model was trained on this raster, but these labels cannot be matched to the ones it was "
                     "trained on (the file's sha256, its layer or the class field differ from the model's "
                     "farslip_model.json; a re-saved copy counts as another file), so its held-out strip is not "
                     "known here: scored on all labelled pixels, which may include those it was trained on"
                     + _give_its_own("labels", trained_labels)]
    if split == "validation" and not same_data:
        raise InputError("--split validation needs a fine-tuned model trained on this raster and these "
                         "labels (the files' sha256, the raster's name in its archive or container, the labels layer "
                         "and the class field must match the model's farslip_model.json).")
    use_validation = same_data and split in ("auto", "validation")
    processing = trained_on.get("processing") or {}
    regridded = []  # the sentence when another resolution keeps the held-out strip from applying
    if use_validation and not _same_grid(scale, gsd_m, processing):
        if split == "validation":
            raise InputError("--split validation scores the held-out strip on the pixel grid the model was trained "
                             f"on, and {_resolution_given(scale, gsd_m)} resamples the raster to another grid; leave "
                             "--scale/--gsd out (the training's resolution is used), or evaluate with --split all.")
        use_validation = False
        regridded = [f"{_resolution_given(scale, gsd_m)} resamples the raster to another grid than the one the model "
                     "was trained on, where its held-out strip was kept: scored on all labelled pixels, those it was "
                     "trained on included (leave --scale/--gsd out to score the held-out strip)."]
    if use_validation:  # the training's own pixels: its grid, bands and AOI (class names, background below)
        bands = bands or processing.get("bands")
        if scale is None and gsd_m is None:
            # A grid of two factors (a --gsd on pixels not square on the ground) comes back from its gsd.
            if processing.get("scale_y") is not None and processing.get("gsd_m"):
                gsd_m = float(processing["gsd_m"])
            else:
                scale = processing.get("scale")
        recorded_aoi = (trained_on["data"].get("aoi") or {}).get("path")
        if aoi is None and recorded_aoi:
            if not Path(recorded_aoi).is_file():
                raise InputError(f"The model was trained inside the area of interest {recorded_aoi}, which is "
                                 "no longer there; give it with --aoi, or evaluate with --split all.")
            layer = trained_on["data"]["aoi"].get("layer")
            aoi = f"{recorded_aoi}|layername={layer}" if layer else recorded_aoi
    if same_labels:  # the labels it was trained on: its class names and background, whatever the split and raster
        class_names = class_names or trained_on["data"].get("labels", {}).get("class_names") or None
        background = background if background is not None else trained_on.get("background")
    # Elsewhere what segment does with the model: the bands its trainer chose, its ground resolution (the
    # raster's own pixel shape kept unless the model was trained on square ground pixels).
    bands = bands_for(raster, bands, loaded)
    square = True
    if scale is None and gsd_m is None:
        gsd_m, square = trained_resolution(loaded.metadata)

    started = time.perf_counter()
    with open_source(raster, bands, scale, gsd_m, square=square, task="evaluate") as source:
        polygons = read_label_polygons(labels, class_field, source.crs, class_names, raster_envelope(source))
        class_lines = model_class_lines(loaded, set(polygons.class_values), background)
        area = read_aoi(aoi, source.crs, raster_envelope(source)) if aoi else None
        grid = build_label_grid(source, polygons, background=background, aoi=area, class_lines=class_lines)
        from backend.engine.presets import parse_class_lines
        from backend.engine.segment import untrained_class_warning

        untrained = untrained_class_warning(loaded, parse_class_lines(grid.class_lines))  # as segment says it
        absent = grid.absent_sentence(polygons.path.name)
        if absent:
            many = len(grid.absent) > 1
            absent += (f"; with no ground truth here, every pixel the model gives {'them' if many else 'it'} is an "
                       f"error, and {'their' if many else 'its'} IoU of 0 (where predicted) lowers the mIoU.")
        said = [*polygons.warnings, *unmatched, *regridded, *([untrained] if untrained else []),
                *([absent] if absent else [])]
        # (after the grid: it counts the polygons outside the raster)
        if use_validation:
            recorded = trained_on["split"]["validation_window"]
            window = PixelWindow(**recorded)
            rows = slice(window.row_off - grid.window.row_off, window.row_off - grid.window.row_off + window.height)
            cols = slice(window.col_off - grid.window.col_off, window.col_off - grid.window.col_off + window.width)
            truth = grid.labels[rows, cols]
            if truth.shape != (window.height, window.width):
                raise InputError("The validation strip recorded in the model does not fit these labels; "
                                 "evaluate with --split all.")
            counts = np.bincount(truth[truth >= 0].ravel(), minlength=len(grid.class_lines))
            said = [*said, *validation_gaps(dict(zip(grid.class_lines, map(int, counts))), grid.pixel_counts(),
                                            trained_on["split"].get("edge", "recorded"))]
        else:
            window, truth = grid.window, grid.labels
        for warning in said:
            if progress is not None:
                progress(0, 0, {"phase": "warning", "message": warning})
        segmenter = segmenter_for(loaded, grid.class_lines, attention=attention, batch_size=batch_size)
        report = None if progress is None else (lambda done, total: progress(done, total, {"phase": "evaluate"}))
        retries: list[str] = []

        def retrying(sentence: str) -> None:
            retries.append(sentence)
            if notice is not None:
                notice(sentence)
            elif progress is not None:  # as the warnings above
                progress(0, 0, {"phase": "warning", "message": sentence})
            else:
                note_on_stderr(sentence)

        predicted = predict_classes(segmenter, source, window, should_cancel, report, retrying, flags)
        metrics = score(truth, predicted, grid.class_names)
        bounds = source.window_bounds(window)
        crs = source.crs.to_string()
    result = {
        "model": loaded.name, "weights_sha256": loaded.weights_id, "raster": str(raster),
        "labels": str(labels), "class_field": class_field, "class_lines": grid.class_lines,
        "background": background, "split": "validation" if use_validation else "all",
        "window": asdict(window), "bbox": list(bounds), "crs": crs,
        # What the run used after the model's own defaults (a quality calibration then uses the same).
        "processing": {"aoi": str(aoi) if aoi else None, "class_names": class_names or {},
                       "bands": list(bands) if bands else None, "scale": scale, "gsd_m": gsd_m,
                       "square": square},
        "metrics": metrics, "text": format_metrics(metrics),
        "batch_size": segmenter.batch_size,  # the one that ran: a retry on a GPU halves it
        "seconds": round(time.perf_counter() - started, 3), "outputs": {},
    }
    result["warnings"] = [*said, *retries]
    result["outputs"] = write_report(result, out_json, out_png, report_title(result))
    return result


# --- training -----------------------------------------------------------------------------------


def check_model_options(loaded: LoadedModel, options: TrainOptions) -> None:
    """The options that depend on the model, checked once it loads and before anything is written."""
    blocks = len(loaded.model.visual.transformer.resblocks)
    if options.method == "last-blocks" and options.last_blocks > blocks:
        raise InputError(f"--last-blocks {options.last_blocks} is more than the {blocks} blocks of {loaded.name}'s "
                         f"vision tower; give at most {blocks} (--method full trains them all).")


def train_model(raster: str | Path, labels: str | Path, class_field: str, out: str | Path,
                base_model: str | None = None, weights: str | None = None, method: str = "lora",
                epochs: int = 5, lr: float | None = None, patch_loss_weight: float = 1.0,
                background: str | None = None, aoi: str | Path | None = None,
                class_names: dict[str, str] | None = None, bands: list[int] | None = None,
                scale: float | None = None, gsd_m: float | None = None, resume: bool = False,
                overwrite: bool = False, device: str = "cpu", options: TrainOptions | None = None,
                loaded: LoadedModel | None = None, progress: Progress | None = None,
                should_cancel: Callable[[], bool] | None = None, out_json: str | Path | None = None,
                typed: frozenset[str] | None = None, checked: CheckedTraining | None = None) -> dict:
    """Fine-tune on labelled polygons; write a model folder that `load_model(out)` loads.

    `typed`: the options (RESUMED_OPTIONS' names) the user gave, whatever their value; None: those that
    differ from their defaults. A resumed run refuses a typed option that differs from the checkpoint's.

    `options` sets the finer knobs (batch size, steps, loss weights, split); the
    explicit arguments method/epochs/lr/patch_loss_weight override it. `out_json` (checked by the caller)
    gets the result as JSON, put in place with the model folder, all or nothing. `checked`: prepare_training's
    answer for these same arguments, when the caller ran it before importing this module (farslip train).
    """
    if checked is None:
        checked = prepare_training(raster, labels, class_field, out, base_model, weights, method, epochs, lr,
                                   patch_loss_weight, background, aoi, class_names, resume, overwrite, options,
                                   progress)
    options, raster, labels, recovered = checked.options, checked.raster, checked.labels, checked.recovered
    # None: the caller chose the folder after the checks (farslip train without --out: the default folder).
    out = checked.out if checked.out is not None else out_folder(out)
    labels_file = vector_file(labels)
    if loaded is None:
        resolve_device(device)
    started = time.perf_counter()
    loaded = _load(base_model, weights, device, loaded)
    check_model_options(loaded, options)
    bands = bands_for(raster, bands, loaded)  # training on from a model fine-tuned on chosen bands keeps them

    with open_source(raster, bands, scale, gsd_m, task=TRAIN_TASK) as source:
        raster_id = raster_record(source.path, source.dataset)
        grid = label_grid_for(source, labels, class_field, background, aoi, class_names)
        absent = grid.absent_sentence(Path(labels_file).name)
        if absent:  # a class the model would be taught by its name alone, competing with the others for every pixel
            many = len(grid.absent) > 1
            raise InputError(f"{absent}: a model cannot learn {'them' if many else 'it'}. Label "
                             f"{'them' if many else 'it'} where the raster has data, or remove those polygons "
                             "from the labels.")
        labels_sha = file_sha256(labels_file)
        window_pixels = grid.window.height * grid.window.width
        if window_pixels > MAX_TRAINING_PIXELS:
            raise InputError(f"The labelled extent is {grid.window.width} x {grid.window.height} pixels; training "
                             f"holds it in memory and takes at most {MAX_TRAINING_PIXELS // 1_000_000} million. "
                             "Label a smaller area, give an --aoi, or train at a coarser resolution "
                             "(--scale 0.5 or --gsd).")
        split = split_labels(grid, source.window_transform(grid.window), options.validation_fraction,
                             options.buffer_px)
        warnings = [*([recovered] if recovered else []), *grid.polygons.warnings, *split_warnings(split)]
        for warning in warnings[1 if recovered else 0:]:
            if progress is not None:
                progress(0, 0, {"phase": "warning", "message": warning})
        rgb, _ = source.read(grid.window)
        data = TrainingData(rgb, grid, split, source.window_transform(grid.window), source)
        earlier_partial = resume and (partial_dir(out) / CHECKPOINT_DIR / "state.pt").is_file()
        work, resuming = start_work_folder(out, resume, overwrite)
        try:
            result = _train_in(work, out, loaded, data, options, resuming, raster, labels, raster_id,
                               labels_sha, class_field, aoi, class_names, started, progress, should_cancel,
                               finished=resuming and not earlier_partial, typed=typed)
        except CancelledError:
            shutil.rmtree(work, ignore_errors=True)
            raise
        except TrainingDiverged as diverged:
            # Its checkpoint holds the last epoch that finished with finite weights (none: nothing is kept); a
            # model trained on from its folder in place stays there as it was.
            in_place = resuming and not earlier_partial
            kept = diverged.finished_epochs if (work / CHECKPOINT_DIR / "state.pt").is_file() and not in_place else 0
            if not kept:
                shutil.rmtree(work, ignore_errors=True)
            diverged.args = (diverged.args[0] + diverged_advice(options, work, out if in_place else None, kept),)
            raise
        except InputError:
            if not earlier_partial:
                shutil.rmtree(work, ignore_errors=True)
            raise
        except BaseException as exc:
            state_file = work / CHECKPOINT_DIR / "state.pt"
            if state_file.is_file():
                # Interrupted or failed after an epoch: keep it for --resume (Ctrl+C included).
                note = (f" The last finished epoch is kept in {work}; run the same command with --resume "
                        "to continue from it.")
                if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
                    exc.args = (exc.args[0] + note, *exc.args[1:])
            else:
                shutil.rmtree(work, ignore_errors=True)
            raise
    result["model_dir"] = str(out)
    warnings = [*warnings, *result.pop("warnings")]  # the run's own (region-category alignment not run)
    if result["best_epoch"] == 0:  # epoch 0 is the base model itself, kept when no epoch beat it
        never = (f"No epoch of the {result['epochs']} scored above the base model on the validation strip, so "
                 f"{out} holds the base model's weights; label more, train longer, or try another --method or --lr.")
        warnings = [*warnings, never]
        if progress is not None:
            progress(0, 0, {"phase": "warning", "message": never})
    result["warnings"] = warnings
    # The model folder, then the --json report of the run: all or nothing.
    move_into_place(work, out, (Path(out_json), json_text(result)) if out_json else None)
    return result


def diverged_advice(options: TrainOptions, work: Path, model_in_place: Path | None, kept: int) -> str:
    """What to do after a training diverged: `model_in_place`, the finished model it trained on from (left as it
    was); `kept`, the epochs of the checkpoint kept in `work` (0: none)."""
    lower = f"a lower --lr (this run used {options.learning_rate:g})"
    if model_in_place is not None:
        return (f" The model in {model_in_place} is left as it was (a resumed run keeps its --lr, so training it on "
                f"would diverge again); start over with --overwrite and {lower}.")
    if not kept:
        return f" Nothing was kept; start over with {lower}."
    return (f" The last finished epoch ({kept}) is kept in {work}: run the same command with --resume --epochs "
            f"{kept} to write the model from it (a resumed run keeps its --lr, so training on would diverge "
            f"again), or start over with --overwrite and {lower}.")


def split_warnings(split) -> list[str]:
    """Classes the training part never shows (the model cannot learn them), and a validation strip that
    holds only such classes (its mIoU then says little): worth a line, not a refusal."""
    unseen = [name for name, count in split.train_pixels.items() if count == 0]
    warnings = []
    if unseen:
        listed = ", ".join(repr(name) for name in unseen)
        warnings.append(f"The class{'es' if len(unseen) > 1 else ''} {listed} {'have' if len(unseen) > 1 else 'has'} "
                        "no labelled pixels in the training part, so the model cannot learn "
                        f"{'them' if len(unseen) > 1 else 'it'}; label more of "
                        f"{'them' if len(unseen) > 1 else 'it'} away from the {split.edge} edge (the "
                        "validation strip).")
    validated = [name for name, count in split.validation_pixels.items() if count > 0]
    if validated and all(name in unseen for name in validated):
        warnings.append(f"The validation strip along the {split.edge} edge holds only classes the training part "
                        f"lacks ({', '.join(repr(name) for name in validated)}), so its mIoU says little about "
                        "the training; label those classes in the training part too.")
    return warnings + validation_gaps(split.validation_pixels, split.train_pixels, split.edge)


def validation_gaps(validation_pixels: dict[str, int], labelled: dict[str, int], edge: str) -> list[str]:
    """The classes labelled elsewhere (`labelled`: pixels of each class outside the strip, or in all the labels)
    that the validation strip holds no pixel of, so that its mIoU leaves them out: a line."""
    lacking = [name for name, count in validation_pixels.items() if count == 0 and labelled.get(name, 0) > 0]
    if not lacking:
        return []
    listed = ", ".join(repr(name) for name in lacking)
    many = len(lacking) > 1
    return [f"The validation strip along the {edge} edge holds no labelled pixels of the class{'es' if many else ''} "
            f"{listed}, so its mIoU does not score how well the model finds {'them' if many else 'it'}; label some "
            f"of {'them' if many else 'it'} near that edge too."]


def raster_record(raster: str | os.PathLike, dataset=None) -> dict:
    """What a training records of its raster to know it again (--resume, evaluate's validation split), from
    feature_cache.raster_reads: the sha256 of the file that holds it and, for a raster inside an archive or a
    container, its name there with that file's path written {} ("name": "GPKG:{}:t1", "/vsizip/{}/x.tif"), so two
    spellings of one table are one raster and a rewritten container another. A plain file's record is
    {"sha256": its sha256}, as trainings have always recorded it (its companion files are not part of it);
    {"sha256": None} for a raster on no file here (/vsicurl/ ...)."""
    reads = raster_reads(raster, dataset)  # its companions are not hashed: the record leaves them out
    if reads is None:
        return {"sha256": None}
    return {"sha256": file_sha256(reads.files[0]), **({"name": reads.where} if reads.where != "{}" else {})}


def same_raster(recorded: dict, current: dict) -> bool:
    """Whether a model's recorded raster (farslip_model.json's data.raster) is the raster `current` records."""
    return (current["sha256"] is not None and recorded.get("sha256") == current["sha256"]
            and recorded.get("name") == current.get("name"))


def checkpoint_raster(record: dict) -> str | dict | None:
    """A raster record as a training's checkpoint keeps it: a plain file's sha256 alone (as checkpoints always
    kept it, so an earlier run resumes), a raster inside an archive or a container with its name."""
    return record if "name" in record else record["sha256"]


def training_data_record(data: TrainingData, raster_id: dict, labels: Path, labels_sha: str | None,
                         class_field: str, aoi, class_names: dict[str, str] | None) -> dict:
    """What defines a training's pixels and classes, as its checkpoint records it for --resume to compare:
    the files (sha256) and layers, the class field and renames, the background, the bands and the grid."""
    aoi_file, aoi_name = aoi_layer(aoi) if aoi else (None, None)
    return {
        "raster": checkpoint_raster(raster_id), "labels": labels_sha,
        "labels_layer": label_layer(labels, class_field)[1],
        "class_field": class_field, "class_names": dict(sorted((class_names or {}).items())),
        "background": data.grid.background,
        "aoi": {"path": str(aoi_file), "sha256": file_sha256(aoi_file), "layer": aoi_name} if aoi_file else None,
        "bands": [int(band) for band in data.source.bands], "scale": float(data.source.scale),
        "scale_y": data.source.scale_y, "gsd_m": native_gsd_m(data.source.dataset) / data.source.scale,
    }


def _renames(names: dict[str, str]) -> str:
    return " ".join(f"--class-name {value}={name}" for value, name in names.items()) or "no --class-name"


def _aoi_text(aoi: dict | None) -> str:
    return f"--aoi {Path(aoi['path']).name}" if aoi else "no --aoi"


DEFAULT_OPTIONS = asdict(TrainOptions())


def training_data_differences(saved: dict, saved_options: dict, now: dict, options: TrainOptions) -> str:
    """What differs between a checkpoint's training data and a resumed run's ("" when nothing does), as
    "--bands 1,2,3 (now 3,2,1) and ..."; a checkpoint from before a key was recorded is not compared on it."""
    differences = []
    if "labels_layer" in saved and saved["labels_layer"] != now["labels_layer"]:
        differences.append(f"the labels layer {saved['labels_layer']!r} (now {now['labels_layer']!r})")
    if "class_field" in saved and saved["class_field"] != now["class_field"]:
        differences.append(f"--class-field {saved['class_field']} (now {now['class_field']})")
    if "class_names" in saved and dict(saved["class_names"]) != now["class_names"]:
        differences.append(f"{_renames(saved['class_names'])} (now {_renames(now['class_names'])})")
    if "background" in saved and saved["background"] != now["background"]:
        then, current = (f"--background {name}" if name else "no --background"
                         for name in (saved["background"], now["background"]))
        differences.append(f"{then} (now {current})")
    if "aoi" in saved:
        then, current = saved["aoi"], now["aoi"]
        if bool(then) != bool(current):
            differences.append(f"{_aoi_text(then)} (now {_aoi_text(current)})")
        elif then and current and then.get("layer") != current.get("layer"):
            differences.append(f"the --aoi layer {then.get('layer')!r} (now {current.get('layer')!r})")
        elif then and current and then["sha256"] != current["sha256"]:
            differences.append(f"{_aoi_text(then)} as it was then (its sha256 differs now)")
    if "bands" in saved and list(saved["bands"]) != now["bands"]:
        differences.append(f"--bands {','.join(map(str, saved['bands']))} (now {','.join(map(str, now['bands']))})")
    # A checkpoint from before scale_y was recorded resampled by one factor: the same as scale_y None.
    if "scale" in saved and not (math.isclose(saved["scale"], now["scale"], rel_tol=1e-6)
                                 and _same_factor(saved.get("scale_y"), now["scale_y"])):
        differences.append(f"{saved['gsd_m']:.4g} m pixels, --scale {_factors(saved)} (now {now['gsd_m']:.4g} m, "
                           f"--scale {_factors(now)})")
    for key, what, unit in (("validation_fraction", "a validation fraction of", ""),
                            ("buffer_px", "a buffer around the validation strip of", " px")):
        if key in saved_options and not math.isclose(saved_options[key], getattr(options, key), rel_tol=1e-9):
            differences.append(f"{what} {saved_options[key]:g}{unit} (now {getattr(options, key):g}{unit})")
    return ", ".join(differences[:-1]) + " and " + differences[-1] if len(differences) > 1 else "".join(differences)


def _same_labels_layer(recorded: dict, labels: str | Path, class_field: str) -> bool:
    """Whether the layer and class field of `labels` are those a model was trained on (its file being the
    same): another layer of one GeoPackage, or another field, is other data."""
    if recorded.get("class_field") not in (None, class_field):
        return False
    then = recorded.get("layer")
    path = vector_file(labels)
    try:
        return (label_layer(f"{path}|layername={then}" if then else path, class_field)[1]
                == label_layer(labels, class_field)[1])
    except InputError:  # the recorded layer is gone, or lacks the field: not the training's labels
        return False


def _factors(record: dict) -> str:
    """A grid's factor as a sentence gives it: one number, or 'X across, Y down' where they differ."""
    if record.get("scale_y") is None:
        return f"{record['scale']:.4g}"
    return f"{record['scale']:.4g} across, {record['scale_y']:.4g} down"


def _same_factor(a: float | None, b: float | None) -> bool:
    """Two factors down the rows (None: the same as across the columns) are the same."""
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6))


def _train_in(work: Path, out: Path, loaded: LoadedModel, data: TrainingData, options: TrainOptions, resuming: bool,
              raster: str, labels: Path, raster_id: dict, labels_sha, class_field: str, aoi, class_names,
              started: float, progress: Progress | None, should_cancel, finished: bool = False,
              typed: frozenset[str] | None = None) -> dict:
    """Train in `work`. `finished`: resuming a model folder already in place (not an interrupted run)."""
    checkpoint = work / CHECKPOINT_DIR
    checkpoint.mkdir(exist_ok=True)
    state = TrainState()
    before = None
    recorded = training_data_record(data, raster_id, labels, labels_sha, class_field, aoi, class_names)
    if resuming:
        saved = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
        where = out if finished else work
        if (saved["data"].get("raster"), saved["data"].get("labels")) != (recorded["raster"], labels_sha):
            raise InputError(f"The training in {where} used other data files (their sha256 differ); resume it "
                             "with the same raster and labels, or start over with --overwrite instead of --resume.")
        if saved["options"]["method"] != options.method:
            raise InputError(f"The training in {where} used --method {saved['options']['method']}; resume it "
                             "with the same method.")
        differences = training_data_differences(saved["data"], saved["options"], recorded, options)
        if differences:
            raise InputError(f"The training in {where} was made with {differences}; resume it with the same "
                             "options (only --epochs may grow), or start over with --overwrite instead of --resume.")
        # An interrupted run that finished its last epoch is finished here (best weights, metadata, final
        # validation); a model already in place continues only with more epochs.
        if finished and options.epochs <= saved["epoch"]:
            raise InputError(f"The training in {out} already ran {saved['epoch']} epochs; pass --epochs "
                             f"larger than {saved['epoch']} to continue it.")
        if options.epochs < saved["epoch"]:
            raise InputError(f"The training in {where} already ran {saved['epoch']} epochs; pass --epochs "
                             f"{saved['epoch']} to finish it, or a larger number to continue it.")
        kept = {k: saved["options"][k] for k in RESUMED_OPTIONS if k in saved["options"]}
        def given_otherwise(key: str) -> bool:
            """Typed with another value than the checkpoint's (left out, it takes the checkpoint's)."""
            now = getattr(options, key)
            if now == kept[key]:
                return False
            return key in typed if typed is not None else now != DEFAULT_OPTIONS[key]

        changed = [f"{flag} {kept[key]} (now {getattr(options, key)})" for key, flag in RESUMED_OPTIONS.items()
                   if key in kept and given_otherwise(key)]
        if changed:
            raise InputError(f"The training in {where} was made with {', '.join(changed)}; a resumed run continues "
                             "with its first run's values (its optimiser and schedule are restored), so leave them "
                             "out or give the same, or start over with --overwrite instead of --resume.")
        options = TrainOptions(**{**asdict(options), **kept})
        state = TrainState(saved["epoch"], saved["best_miou"], saved["best_epoch"],
                           json.loads(saved["history"]))
        before = json.loads(saved["before"])

    steps = default_steps(data, options, crop_size(loaded.model.visual, options, data.split))
    options.steps_per_epoch = steps
    if loaded.device.type == "cuda":  # the record's peak GPU memory is this training's, not an earlier job's
        torch.cuda.reset_peak_memory_stats(loaded.device)
    trainer = Trainer(loaded, data, options, options.epochs * steps)
    region_warning, region_record = trainer.batches.region_warning(), trainer.batches.region_record()
    retries: list[str] = []  # a validation batch that ran out of GPU memory, run again at half the size

    def retrying(sentence: str) -> None:
        retries.append(sentence)
        if progress is not None:
            progress(0, 0, {"phase": "warning", "message": sentence})
        else:
            note_on_stderr(sentence)

    trainer.validation.notice = retrying

    if resuming:
        last = load_tensors(checkpoint / "last.safetensors")
        losses = [record["loss"] for record in state.history if record.get("loss") is not None]
        if not adapters.all_finite(last.values()) or not all(math.isfinite(loss) for loss in losses):
            raise InputError(f"The training in {where} diverged (its checkpoint holds weights or losses that are not "
                             "finite numbers), so it cannot be resumed; start over with --overwrite instead of "
                             f"--resume, and a lower --lr than {options.learning_rate:g}.")
        adapters.load_trainable_state(trainer.model, last)
        trainer.optimisation.restore(saved)
    else:
        if progress is not None:
            progress(0, options.epochs * steps, {"phase": "validate", "epoch": 0})
        before = trainer.validate(should_cancel, model=loaded.model)
        state.best_miou, state.best_epoch = (before["miou"] or 0.0), 0
        save_tensors(adapters.trainable_state(trainer.model), checkpoint / "best.safetensors")
    assert before is not None, "the untrained model's figures come from the checkpoint or the first validation"
    if region_warning is not None and progress is not None:  # said once the run is sure to train
        progress(0, 0, {"phase": "warning", "message": region_warning})

    def save_checkpoint(current: TrainState, improved: bool) -> None:
        tensors = adapters.trainable_state(trainer.model)
        save_tensors(tensors, checkpoint / "last.safetensors")
        if improved:
            save_tensors(tensors, checkpoint / "best.safetensors")
        payload = {
            "epoch": current.epoch, "best_miou": current.best_miou, "best_epoch": current.best_epoch,
            "history": json.dumps(current.history), "before": json.dumps(before),
            **trainer.optimisation.state(),
            "options": asdict(options), "data": recorded,
        }
        with atomic_output(checkpoint / "state.pt") as staged:
            torch.save(payload, staged)

    train_started = time.perf_counter()
    first_epoch = state.epoch
    state = run_epochs(trainer, state, steps, save_checkpoint, progress, should_cancel)
    train_seconds = time.perf_counter() - train_started
    crops = (state.epoch - first_epoch) * steps * options.batch_size

    # Best weights (epoch 0 = the base model itself when training never beat it).
    adapters.load_trainable_state(trainer.model, load_tensors(checkpoint / "best.safetensors"))
    distill_side, input_px = trainer.distill_side, trainer.input_px
    merged = adapters.merged_state_dict(trainer.model)
    save_tensors(merged, work / FINETUNED_WEIGHTS, metadata={"format": FINETUNED_FORMAT})
    copy_text_tower(loaded, work)
    trainer.model = trainer.teacher_visual = None  # free memory before the reload below

    grid, split = data.grid, data.split
    validation_window = data.validation_window
    meta = {
        "format": FINETUNED_FORMAT,
        "name": out.name,
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": loaded.name,
        "base_weights_sha256": loaded.weights_id,
        "arch": (getattr(loaded, "metadata", {}) or {}).get("spec", {}).get("arch"),
        "context_length": loaded.context_length,
        "text_tower": (loaded.metadata.get("text_tower") or {}).get("name"),
        "languages": loaded.metadata.get("languages") or ["en"],
        "activation": (getattr(loaded, "metadata", {}) or {}).get("activation", "quickgelu"),
        "description": f"Fine-tuned from {loaded.name} on {raster_label(raster)} "
                       f"({len(grid.class_lines)} classes, {options.method})",
        "class_lines": grid.class_lines,
        "background": grid.background,
        "prompts": {"inference": "OpenAI ImageNet templates (80)", "region_alignment": REGION_PROMPT},
        "data": {
            "raster": {"path": absolute_raster_name(raster), **raster_id},
            "labels": {"path": str(vector_file(labels).resolve()), "sha256": labels_sha,
                       "layer": split_layer(labels)[1], "class_field": class_field, "class_names": class_names or {}},
            "aoi": {"path": str(vector_file(aoi).resolve()), "sha256": file_sha256(vector_file(aoi)),
                    "layer": split_layer(aoi)[1]} if aoi else None,
        },
        "processing": {"scale": data.source.scale, "scale_y": data.source.scale_y, "bands": data.source.bands,
                       # The bands the trainer chose (--bands), which segment and evaluate then use too.
                       "bands_chosen": (data.source.bands
                                        if data.source.bands != select_bands(data.source.dataset, None) else None),
                       "crs": data.source.crs.to_string(),
                       "gsd_m": native_gsd_m(data.source.dataset) / data.source.scale},
        "label_window": asdict(grid.window),
        "label_pixels": grid.pixel_counts(),
        "split": {**split.to_json(), "validation_window": asdict(validation_window)},
        "training": {**asdict(options), "learning_rate": options.learning_rate,
                     "epochs_run": state.epoch, "best_epoch": state.best_epoch, "history": state.history,
                     "device": str(loaded.device), "seconds": round(train_seconds, 3),
                     "crops_per_second": round(crops / train_seconds, 3) if crops and train_seconds > 0 else None,
                     "peak_rss_mb": round(peak_rss_mb(), 1),
                     "peak_gpu_mb": (round(torch.cuda.max_memory_allocated(loaded.device) / 2**20, 1)
                                     if loaded.device.type == "cuda" else None)},
        "distillation": {"teacher": options.teacher, "global_view_native_px": distill_side,
                         "native_px_per_view_px": round(distill_side / input_px, 3),
                         "box_area": list(BOX_AREA), "box_aspect": [round(a, 4) for a in BOX_ASPECT],
                         "boxes_per_view": options.distill_boxes},
        "region_boxes": {"sqrt_area_native_px": [options.region_min_px, options.region_max_px], **region_record},
        "metrics": {"before": before, "after": None},
    }
    write_json(meta, work / FINETUNED_META)

    # The "after" figures come from the written folder, loaded as `--model DIR` loads it, so that
    # `farslip evaluate --model DIR` reports exactly the same numbers.
    from backend.engine.models import load_model

    if progress is not None:
        progress(options.epochs * steps, options.epochs * steps, {"phase": "final-validate"})
    reloaded = load_model(str(work), device=str(loaded.device))
    segmenter = segmenter_for(reloaded, grid.class_lines, attention=options.attention,
                              batch_size=trainer.validation.batch_size)  # --eval-batch-size, or what fitted
    predicted = predict_classes(segmenter, data.source, validation_window, should_cancel, notice=retrying)
    after = score(data.validation_labels, predicted, grid.class_names)
    meta["metrics"]["after"] = after
    write_json(meta, work / FINETUNED_META)
    (work / "evaluation.txt").write_text(
        f"Validation strip ({split.edge} edge, {after['pixels']} labelled pixels)\n\n"
        f"Before fine-tuning ({loaded.name}):\n{format_metrics(before)}\n\n"
        f"After fine-tuning (best epoch {state.best_epoch}):\n{format_metrics(after)}\n", encoding="utf-8")
    plot_confusion(before, work / "confusion_before.png", f"before: mIoU {100 * (before['miou'] or 0):.2f} %")
    plot_confusion(after, work / "confusion_after.png", f"after: mIoU {100 * (after['miou'] or 0):.2f} %")
    return {
        "model_dir": str(out), "base_model": loaded.name, "method": options.method,
        "class_lines": grid.class_lines, "epochs": state.epoch, "best_epoch": state.best_epoch,
        "metrics": {"before": before, "after": after}, "history": state.history,
        "split": meta["split"], "training": {k: meta["training"][k] for k in
                                             ("seconds", "crops_per_second", "peak_rss_mb", "peak_gpu_mb")},
        "seconds": round(time.perf_counter() - started, 3),
        "warnings": [*([region_warning] if region_warning else []), *dict.fromkeys(retries)],
    }


# --- the server's job runner ----------------------------------------------------------------------

_REQUEST_ARGS = ("raster", "labels", "class_field", "out", "base_model", "weights", "method", "epochs", "lr",
                 "patch_loss_weight", "background", "aoi", "class_names", "bands", "scale", "gsd_m", "resume",
                 "overwrite", "device")


def check_request(request: dict) -> list[str]:
    """Quick checks of a POST /v1/train body before it is queued; returns the output paths it will write."""
    check_raster_name(raster_name(request["raster"]), "raster")  # a subdataset once its file is here
    check_vector_source(vector_file(request["labels"]), "labels")
    if request.get("aoi"):
        aoi_layer(request["aoi"])  # a FIFO or a file without the named layer is refused now, not in the job
    out = out_folder(request["out"], '"out"')
    check_out_folder(out, bool(request.get("overwrite")), bool(request.get("resume")),
                     training_inputs(request["raster"], request["labels"], request.get("aoi"),
                                     request.get("base_model"), request.get("weights")))
    if request.get("resume"):
        check_resumable(out)
    check_base_model(request.get("base_model"), request.get("weights"))
    unknown = set(request) - set(_REQUEST_ARGS) - set(TrainOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"Unknown training option(s): {', '.join(sorted(unknown))}.")
    return [str(out)]


def request_arguments(request: dict) -> tuple[dict, TrainOptions]:
    """A POST /v1/train body as train_model's arguments and the finer TrainOptions they run with."""
    values = {k: v for k, v in request.items() if v is not None}
    args = {k: values.pop(k) for k in _REQUEST_ARGS if k in values}
    return args, TrainOptions(**{**asdict(TrainOptions()), **values})


def check_request_options(request: dict) -> None:
    """The options a POST /v1/train body will train with, checked as train_model checks them."""
    from backend.engine.options import check_option, check_scale_or_gsd

    args, options = request_arguments(request)
    run_options(options, **{k: args[k] for k in ("method", "epochs", "lr", "patch_loss_weight") if k in args})
    check_background(args.get("background"))
    check_class_names(args.get("class_names"))
    if args.get("device") is not None:
        resolve_device(args["device"])  # segment's check: a device this machine has
    check_scale_or_gsd(args.get("scale"), args.get("gsd_m"))  # segment's ranges: the same raster reader
    check_option("bands", args.get("bands"))
    bands, scale, gsd_m = args.get("bands"), args.get("scale"), args.get("gsd_m")
    if "raster" in args and any(value is not None for value in (bands, scale, gsd_m)):
        with open_source(args["raster"], bands, scale, gsd_m, task=TRAIN_TASK):  # its bands, a --gsd it can take
            pass


def train_request(request: dict, progress: Callable[[int, int], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  message: Callable[[str], None] | None = None, loaded: LoadedModel | None = None,
                  step_message: Callable[[str], None] | None = None) -> dict:
    """Run a POST /v1/train body (the `farslip train` options as JSON) as a job.

    `progress(step, total)` and `message(text)` are the job's callbacks: steps for the bar, and for the job's
    message what the run is doing: validating, then the training steps as the CLI's lines give them
    (`train: n/N, loss L (epoch e/E)`), one sentence per epoch (loss, validation mIoU), the warnings. The steps'
    message goes to `step_message` when given (a job's, which keeps it with the progress reported right after
    it), else to `message`.
    """
    check_request(request)
    args, options = request_arguments(request)

    def report(step: int, total: int, info: dict) -> None:
        if info.get("phase") == "warning":
            if message is not None:
                message(f"Warning: {info['message']}")
            return
        if info.get("phase") == "train" and (step_message or message) is not None:
            (step_message or message)(f"train: {step}/{total}, loss {info['loss']:.4f} "  # type: ignore[misc]
                                      f"(epoch {info['epoch']}/{info['epochs']})")
        if progress is not None:
            progress(step, total)
        if message is None:
            return
        if info.get("phase") == "validate" and info.get("epoch"):
            message(f"epoch {info['epoch']}/{info['epochs']}: loss {info['loss']:.4f}, validation mIoU "
                    f"{100 * (info['val_miou'] or 0):.2f} % (best {100 * info['best_miou']:.2f} %)")
        elif info.get("phase") == "validate":
            message("validating the base model on the held-out strip")
        elif info.get("phase") == "final-validate":
            message("writing the model and validating it")

    typed = frozenset(key for key, value in request.items() if key in RESUMED_OPTIONS and value is not None)
    result = train_model(args.pop("raster"), args.pop("labels"), args.pop("class_field"), args.pop("out"),
                         options=options, loaded=loaded, progress=report, should_cancel=should_cancel,
                         typed=typed, **args)
    out = Path(result["model_dir"])
    result["outputs"] = absolute_outputs({"model_dir": out, "report": out / "evaluation.txt",
                                          "metadata": out / FINETUNED_META})
    return result
