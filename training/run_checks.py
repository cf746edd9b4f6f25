"""What a training or an evaluation refuses before a model loads, without torch: `farslip train` and
`farslip evaluate` run these before they import torch and open_clip, so a missing labels file, a bad option or an
--out that may not be written is said in about a second; training/api.py and the server's job checks run the same
functions."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.engine.errors import InputError, ModelError
from backend.engine.files import check_output_file, input_paths, raster_file, raster_name, refuse_outputs_over_inputs
from backend.engine.finetuned import recover_model_folder
from backend.engine.model_location import check_model, locate_model
from backend.engine.options import ATTENTION_VARIANTS, Range

from .labels import check_background, check_class_names, label_layer, vector_file
from .model_folder import check_out_folder, out_folder
from .train_options import METHODS, TEACHERS, TrainOptions

Progress = Callable[[int, int, dict], None]

# What a resumed run takes from its checkpoint (the restored optimiser keeps the first run's learning rate),
# with the flag that sets each: a value given now that differs from the checkpoint's is refused.
RESUMED_OPTIONS = {"lr": "--lr", "batch_size": "--batch-size", "steps_per_epoch": "--steps-per-epoch",
                   "seed": "--seed", "lora_rank": "--lora-rank", "last_blocks": "--last-blocks",
                   "crop_px": "--crop-px", "teacher": "--teacher"}


def class_names_from_pairs(pairs: list[str]) -> dict[str, str]:
    """["yes=building", "1=water"] -> {"yes": "building", "1": "water"} (CLI --class-name)."""
    mapping = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--class-name takes VALUE=NAME (e.g. yes=building); got {pair!r}.")
        value, name = (part.strip() for part in pair.split("=", 1))
        if not value or not name:
            raise InputError(f"--class-name takes VALUE=NAME with both parts; got {pair!r}.")
        mapping[value] = name
    return mapping


def as_base_model(error: ModelError) -> ModelError:
    """The model sentence of `segment` with the option train takes the model by (--base-model)."""
    return ModelError(re.sub(r"(?<![\w-])--model\b", "--base-model", str(error)))


def check_base_model(base_model: str | None, weights: str | None) -> None:
    """--base-model and --weights name a model that is there (load_model's sentences, said as train names them)."""
    try:
        check_model(base_model, weights)
    except ModelError as error:
        raise as_base_model(error) from error


def check_attention(attention: str) -> None:
    if attention not in ATTENTION_VARIANTS:
        raise InputError(f"--attention must be one of {', '.join(ATTENTION_VARIANTS)}; got {attention!r}.")


def check_quality_tile(tile: int) -> None:
    if not 16 <= tile <= 1024:
        raise InputError(f"--quality-tile must be between 16 and 1024 pixels; got {tile}.")


def evaluation_inputs(raster=None, labels=None, aoi=None, model=None, weights=None) -> dict[str, Path]:
    """The files an evaluation reads (which no output may replace): a raster named in GDAL's syntax by the file
    that holds it (a subdataset's container, an archive)."""
    return input_paths([("raster", raster_file(raster) if raster else None),
                        ("labels", vector_file(labels) if labels else None),
                        ("area of interest", vector_file(aoi) if aoi else None), ("model", model),
                        ("weights", weights)])


def check_report_outputs(outputs: dict[str, str | Path | None], inputs: dict[str, Path],
                         overwrite: bool) -> dict[str, Path]:
    """Report files ({"--json file": path, ...}) checked before a model loads: a name the disk takes, in a
    folder that exists and takes files, none of them an input or another output, none there yet unless
    `overwrite`; a confusion matrix is a PNG."""
    for what, given in outputs.items():
        if given:  # as given: a name ending in a separator (a folder's) is refused before Path drops it
            check_output_file(given, what, inputs, overwrite=overwrite, gdal=False)  # Python writes reports
    chosen = {what: Path(path) for what, path in outputs.items() if path}
    for what, path in chosen.items():
        if what.startswith("--png") and path.suffix.lower() not in ("", ".png"):
            raise InputError(f"The {what} {path} must end in .png: the confusion matrix is written as a PNG "
                             "image.")
    refuse_outputs_over_inputs(chosen, {})
    return chosen


def check_evaluation(model: str | None, weights: str | None, background: str | None,
                     class_names: dict[str, str] | None, split: str) -> None:
    """What an evaluation refuses before a model loads (and the server before it queues the job): an unknown
    split, a blank background or class name, the validation split of a model that no training wrote."""
    if split not in ("auto", "all", "validation"):
        raise InputError(f"--split must be auto, all or validation; got {split!r}.")
    check_background(background)
    check_class_names(class_names)
    if split == "validation":
        kind, where, explicit = locate_model(model, weights)
        if kind != "finetuned":
            raise InputError(f"--split validation scores the held-out strip that farslip train kept aside, and "
                             f"{_model_used(kind, where, explicit, model)} is not a fine-tuned model folder; evaluate "
                             "it with --split all (or auto).")


def _model_used(kind: str, where, weights: str | None, model: str | None) -> str:
    """The model an evaluation would load, as a sentence names it (locate_model's answer): --model as given,
    the --weights file given alone, the registry model with the weights file given for it, or the default
    model by its name."""
    if kind == "checkpoint":
        return model if model else f"the weights file {where}"
    name = where.name if model else f"the default model ({where.name})"
    return f"{name} with the weights file {weights}" if weights else name


def training_inputs(raster, labels, aoi=None, base_model=None, weights=None) -> dict[str, Path]:
    """The files a training reads (which --out must not hold): a raster named in GDAL's syntax by the file that
    holds it (a subdataset's container, an archive)."""
    return input_paths([("raster", raster_file(raster) if raster else None),
                        ("labels", vector_file(labels) if labels else None),
                        ("area of interest", vector_file(aoi) if aoi else None),
                        ("base model", base_model), ("weights", weights)])


def check_options(options: TrainOptions) -> None:
    """Every option against the values it takes (TrainOptions' table), in one sentence naming it as the command
    line spells it; checked before a model loads (the server's submission runs this too)."""
    if options.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}; got {options.method!r}.")
    check_attention(options.attention)
    if options.teacher not in TEACHERS:
        raise InputError(f"--teacher must be frozen (the base model, the default for small data) or active "
                         f"(the network being trained, as FarSLIP's release); got {options.teacher!r}.")
    if not isinstance(options.augment, bool):
        raise InputError(f"--augment must be true or false; got {str(options.augment)[:100]!r}.")
    hints = typing.get_type_hints(TrainOptions)
    for item in dataclasses.fields(TrainOptions):
        value, allowed = getattr(options, item.name), item.metadata.get("range")
        if allowed is None or value is None:  # None: the default (the method's rate, the model's input size)
            continue
        whole = int in (hints[item.name], *typing.get_args(hints[item.name]))
        if not _within(value, allowed, whole):
            sentence = item.metadata["error"] or (f"{item.metadata['flag']} must be {allowed.describe(whole)}"
                                                  f"{item.metadata['why']}; got {{value}}.")
            raise InputError(sentence.format(value=str(value)[:100]))
    if options.region_min_px > options.region_max_px:
        raise InputError(f"--region-min-px ({options.region_min_px:g}) must not exceed --region-max-px "
                         f"({options.region_max_px:g}): region boxes are the labelled polygons whose sqrt(area) in "
                         "native pixels lies between the two.")


def _within(value, allowed: Range, whole: bool) -> bool:
    """Whether `value` is a number (a whole one where `whole`) inside `allowed`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return value in allowed and not (whole and value != int(value))
    except (OverflowError, ValueError):  # an int too large for a float
        return False


def run_options(options: TrainOptions | None, method: str = "lora", epochs: int = 5, lr: float | None = None,
                patch_loss_weight: float = 1.0) -> TrainOptions:
    """The options a training runs with: `options` (the finer knobs) with the explicit method, epochs, lr
    and patch-loss weight over them, checked."""
    options = TrainOptions(**asdict(options)) if options else TrainOptions()
    options.method, options.epochs, options.patch_loss_weight = method, int(epochs), float(patch_loss_weight)
    if lr is not None:
        options.lr = float(lr)
    check_options(options)
    return options


@dataclass(frozen=True)
class CheckedTraining:
    """A training's arguments once checked (prepare_training): the options it runs with, the raster as GDAL
    names it, the labels, the --out folder and the sentence of a killed training's model replace undone
    there (None if none was)."""

    options: TrainOptions
    raster: str
    labels: Path
    out: Path | None  # None: no --out given, the default folder is chosen once these checks pass
    recovered: str | None


def prepare_training(raster: str | Path, labels: str | Path, class_field: str, out: str | Path | None,
                     base_model: str | None = None, weights: str | None = None, method: str = "lora",
                     epochs: int = 5, lr: float | None = None, patch_loss_weight: float = 1.0,
                     background: str | None = None, aoi: str | Path | None = None,
                     class_names: dict[str, str] | None = None, resume: bool = False, overwrite: bool = False,
                     options: TrainOptions | None = None, progress: Progress | None = None) -> CheckedTraining:
    """Everything a training checks before its model loads, in this order: the options, the background and
    class names, --out (after a killed training's model replace there is undone or finished, said as a warning
    through `progress`), the labels file and its class field. `out` None (no --out given): the folder is
    chosen after these checks (model_folder.default_out_folder, a new one), so --out is not checked here."""
    options = run_options(options, method, epochs, lr, patch_loss_weight)
    check_background(background)
    check_class_names(class_names)
    # The raster as GDAL gets it: a pathlib.Path folds /vsizip//abs/a.zip/x.tif and HDF5:"a.h5"://var.
    raster, labels = raster_name(raster), Path(labels)
    folder, recovered = None, None
    if out is not None:
        folder = out_folder(out)
        # A training of `out` killed while it put its model in place: the previous model back first (or its
        # commit finished), said as a warning.
        recovered = recover_model_folder(folder)
        if recovered is not None and progress is not None:
            progress(0, 0, {"phase": "warning", "message": recovered})
        check_out_folder(folder, overwrite, resume, training_inputs(raster, labels, aoi, base_model, weights))
    label_layer(labels, class_field)  # a missing field is said before the model loads (or asks for weights)
    return CheckedTraining(options, raster, labels, folder, recovered)
