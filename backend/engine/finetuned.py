"""The fine-tuned model format: a folder with model.safetensors and farslip_model.json.

Training writes it (training/api.py) and the engine reads it; both use the names and checks here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from backend.engine import paths
from backend.engine.errors import InputError, ModelError
from backend.engine.files import raster_label
from backend.engine.options import finite_number

if TYPE_CHECKING:
    from backend.engine.options import SegmentOptions

FINETUNED_FORMAT = "farslip-finetuned/1"


FINETUNED_WEIGHTS = "model.safetensors"


FINETUNED_META = "farslip_model.json"


def trained_bands(metadata: dict | None) -> list[int] | None:
    """The bands a fine-tuned model was trained on when its trainer chose them (--bands), not the
    raster's default red, green, blue; None for a base model or a model trained on the defaults."""
    processing = ((metadata or {}).get("finetuned") or {}).get("processing") or {}
    chosen = processing.get("bands_chosen")
    if isinstance(chosen, list) and chosen and all(isinstance(b, int) and b >= 1 for b in chosen):
        return list(chosen)
    return None


def trained_resolution(metadata: dict | None) -> tuple[float | None, bool]:
    """(ground resolution in metres, square) that a fine-tuned model was trained at, for a run that sets
    none: `square` when its training resampled to square ground pixels (a --gsd on pixels that are not
    square on the ground, recorded as two factors); otherwise the resolution is the width of its grid's
    pixels, whose shape was its raster's own, and a run keeps its raster's shape the same way (on the
    training raster itself: its own grid). (None, True) for a base model."""
    processing = ((metadata or {}).get("finetuned") or {}).get("processing") or {}
    gsd = processing.get("gsd_m")
    if not gsd:
        return None, True
    return float(gsd), processing.get("scale_y") is not None


def with_trained_resolution(options: SegmentOptions, metadata: dict | None) -> SegmentOptions:
    """`options` with the resolution a fine-tuned model was trained at (trained_resolution) where they set
    none (no scale, no gsd_m), and how it resamples (options.square_gsd): the job (segment.with_model_defaults)
    and the server's check before queueing it run the same grid. Applied twice, the same options."""
    trained_gsd, square = trained_resolution(metadata)
    if options.scale is None and options.gsd_m is None and trained_gsd:
        return replace(options, gsd_m=trained_gsd, square_gsd=square)
    return options


@contextlib.contextmanager
def trained_resolution_said(model: object, given: SegmentOptions, applied: SegmentOptions,
                            unless: str = "unless --scale or --gsd says otherwise") -> Iterator[None]:
    """A refusal of the resolution a fine-tuned model set (with_trained_resolution), not one the user gave,
    said as the model's: '--gsd 0.5 would resample ...' named an option the user never typed."""
    try:
        yield
    except InputError as error:
        if applied.gsd_m == given.gsd_m or not str(error).startswith("--gsd "):
            raise
        raise InputError(f"The model {model} was fine-tuned on {applied.gsd_m:g} m pixels, so it segments at that "
                         f"resolution {unless}: {error}") from None


def model_bands_for(raster: str | os.PathLike, chosen: list[int], model: str) -> list[int]:
    """The bands a fine-tuned model was trained on, for a run that names none; a sentence when the
    raster lacks them (the default red, green, blue would show the model other colours than it learnt)."""
    from backend.engine.raster import open_dataset  # rasterio only where a model's bands are checked

    with open_dataset(os.fspath(raster)) as ds:
        count = ds.count
    if max(chosen) > count:
        raise InputError(f"Model '{model}' was trained on bands {','.join(map(str, chosen))} of its raster, and "
                         f"{raster_label(raster)} has {count} band(s). Give --bands to say which bands are red, "
                         "green and blue for this raster.")
    return list(chosen)


def bands_for(raster: str | os.PathLike, bands: list[int] | None, loaded) -> list[int] | None:
    """The bands a run reads: the user's, else those the model was trained on when its trainer chose them
    (segment, evaluate, classify, index/search and training from a fine-tuned model alike)."""
    if bands:
        return list(bands)
    chosen = trained_bands(getattr(loaded, "metadata", None))
    return model_bands_for(raster, chosen, loaded.name) if chosen else None


def is_finetuned_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / FINETUNED_WEIGHTS).is_file() and (p / FINETUNED_META).is_file()


def finetuned_dir_of(path: str | os.PathLike) -> Path | None:
    """The fine-tuned model folder whose weights `path` is: its model.safetensors, beside the farslip_model.json
    that describes it (the layout `farslip train --out` writes). Given as a model, that file is the folder's model
    (its activation, classes, bands, resolution and name), never a bare checkpoint. None for any other file."""
    p = Path(path)
    return p.parent if p.name == FINETUNED_WEIGHTS and is_finetuned_dir(p.parent) else None


def read_finetuned_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / FINETUNED_META
    try:  # utf-8-sig: Notepad's "UTF-8" puts a byte order mark first
        meta = json.loads(meta_file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_file} is unreadable ({exc}).") from exc
    fmt = str(meta.get("format", "")) if isinstance(meta, dict) else ""
    if not fmt.startswith("farslip-finetuned/"):
        raise ModelError(f"{meta_file} is not a FarSLIP fine-tuned model description "
                         f"(format '{fmt}', expected '{FINETUNED_FORMAT}').")
    lines = meta.get("class_lines")
    if lines is not None and not (isinstance(lines, list) and all(isinstance(s, str) for s in lines)):
        raise ModelError(f"{meta_file}: 'class_lines' must be a list of strings.")
    _check_meta_values(meta_file, meta)
    return meta


def _check_meta_values(meta_file: Path, meta: dict) -> None:
    """The values the engine reads from a model description have their types (a hand-edited file refused in one
    sentence, never a traceback in `farslip models`, GET /v1/models or a run)."""
    def wrong(key: str, wanted: str, value=None) -> ModelError:
        value = meta.get(key) if value is None else value
        return ModelError(f"{meta_file}: {key!r} must be {wanted}; got {json.dumps(value)[:100]}. Train the model "
                          "again, or correct the file.")

    for key in ("name", "activation", "arch", "description", "licence", "base_model"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise wrong(key, "a text")
    context = meta.get("context_length")
    if context is not None and not (isinstance(context, int) and not isinstance(context, bool) and context > 0):
        raise wrong("context_length", "a whole number above 0")
    languages = meta.get("languages")
    if languages is not None and not (isinstance(languages, list) and all(isinstance(c, str) for c in languages)):
        raise wrong("languages", "a list of language codes")
    processing = meta.get("processing")
    if processing is None:
        return
    if not isinstance(processing, dict):
        raise wrong("processing", "an object")
    for key in ("gsd_m", "scale", "scale_y"):
        if processing.get(key) is not None and not (finite_number(processing[key]) and processing[key] > 0):
            raise wrong(f"processing.{key}", "a number above 0", processing[key])
    for key in ("bands", "bands_chosen"):
        bands = processing.get(key)
        if bands is not None and not (isinstance(bands, list) and all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands)):
            raise wrong(f"processing.{key}", "a list of band numbers from 1", bands)


def finetuned_dirs() -> list[Path]:
    root = paths.models_dir()
    try:
        return sorted(p for p in root.iterdir() if is_finetuned_dir(p))
    except OSError:
        return []


def recover_model_folder(path: str | os.PathLike) -> str | None:
    """A training killed (SIGKILL, a power cut) while it put its model in place at `path` (training/model_folder.py's
    move_into_place: the previous model renamed aside, then the new one in) is rolled back from its commit journal:
    the previous model back at `path`, the trained one back in the training's working folder (whose --resume puts
    it in place); or, when the new model was all in place, the commit is finished. Returns what happened, in one
    sentence, or None when no such training was left. The next training of `path`, a load of the model at `path`
    and the server's restart call it."""
    from backend.engine.atomic import recover_dead_commits

    from backend.engine.temporary import OWNER_FILE, remove_owned, staged_stem

    path = Path(os.path.abspath(path))
    recoveries = recover_dead_commits(path.parent, path)
    for recovery in recoveries:  # the dead training's staged --json report, say
        with contextlib.suppress(OSError, AssertionError):
            remove_owned([staged_stem(out, recovery.tag) for out in recovery.outputs])
    if any(recovery.finished for recovery in recoveries):
        # The working folder's owner (the dead training), which it removes once its model is in place.
        with contextlib.suppress(OSError):
            (path / OWNER_FILE).unlink()
    return " ".join(_recovered(path, recovery) for recovery in recoveries) or None


def _recovered(path: Path, recovery) -> str:
    """The sentence for a training's commit of `path` that recover_commit rolled back or finished; it begins with
    the path (it follows "...; " in a server job's message)."""
    kept = [folder for folder in recovery.kept if Path(folder).is_dir()]
    trained = (f"; the trained model is kept in {kept[0]}: run that training again with --resume to put it in "
               "place") if kept else ""
    if recovery.finished:  # only leftover copies of the previous model to remove; `left`: those that stay
        leftover = (f"; the previous model's copy could not be removed ({'; '.join(recovery.left)}): delete it "
                    "when you no longer need it" if recovery.left else " (the previous model's copy was removed)")
        return (f"{path} holds the new model of a training that was stopped just after it put the model there; "
                f"it is complete{leftover}.")
    if recovery.left:
        return (f"{path}: a training was stopped while it put its model there, and undoing that failed: "
                f"{'; '.join(recovery.left)}. Move them where they belong by hand.")
    if str(path) in recovery.restored:
        return f"{path} holds the previous model again: a training that was replacing it was stopped midway{trained}."
    return f"{path} was not written: a training was stopped while it put its model there{trained}."
