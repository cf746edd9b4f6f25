"""Where a model comes from, without torch: a registry name, a checkpoint file or a fine-tuned model folder, found
and checked (locate_model, check_model) with the same sentences as load_model, which reads the weights. The
command line checks --model and --weights here before the model's imports, which take seconds."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from backend.engine import paths
from backend.engine.errors import ModelError
from backend.engine.files import expand_user, kind_of
from backend.engine.finetuned import (
    FINETUNED_META,
    FINETUNED_WEIGHTS,
    finetuned_dir_of,
    finetuned_dirs,
    is_finetuned_dir,
    read_finetuned_meta,
    recover_model_folder,
)
from backend.engine.registry import DEFAULT_MODEL, known_models

log = logging.getLogger("farslip.models")


def _refuse_special(path: Path, what: str) -> None:
    """A FIFO or device given as a model would block the load: refuse it by name."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ModelError(f"The {what} {path} is {kind_of(mode)}, not a checkpoint file or model folder.")


def _unreadable_why(folder: Path) -> str | None:
    """Why a fine-tuned model folder's description cannot be read (a broken one is no model to offer); None
    when it can."""
    try:
        read_finetuned_meta(folder)
    except ModelError as error:
        return str(error)
    return None


def _readable(folder: Path) -> bool:
    return _unreadable_why(folder) is None


def unusable_finetuned() -> list[tuple[Path, str]]:
    """Fine-tuned model folders that are not offered as models, with the sentence saying why."""
    return [(folder, why) for folder in finetuned_dirs() if (why := _unreadable_why(folder)) is not None]


def unknown_model_error(name: str) -> ModelError:
    """The error for a name that is neither a registry model, a path nor a fine-tuned model."""
    names = list(known_models()) + [p.name for p in finetuned_dirs() if _readable(p)]
    return ModelError(f"Unknown model '{name}'. Known models: {', '.join(names)}. "
                      "You can also give the path of a checkpoint file or of a fine-tuned model folder.")


def locate_model(model: str | None = None, weights: str | None = None) -> tuple[str, Any, str | None]:
    """Where `load_model` would take a model from, without reading any weights.

    Returns ("registry", spec, weights), ("finetuned", folder, None) or ("checkpoint", file, None);
    raises ModelError with the same sentences as `load_model`.
    """
    registry = known_models()
    if model is not None and not model.strip():
        # `--model "$MODEL"` with MODEL unset: the default model would run without the user knowing.
        raise ModelError(f"--model is empty: leave it out to use the default model ({DEFAULT_MODEL}), or name a "
                         f"model ({', '.join(registry)}), a checkpoint file or a fine-tuned model folder.")
    if weights is not None and not weights.strip():
        raise ModelError("--weights is empty: leave it out, or give the path of a weights file or of a fine-tuned "
                         "model folder.")
    if model is None and weights:
        return _locate_weights_alone(weights)
    name = model or DEFAULT_MODEL
    spec = registry.get(name)
    if spec is not None:
        if weights and expand_user(weights, "weights", ModelError).is_dir():
            folder = expand_user(weights, "weights", ModelError)
            if not is_finetuned_dir(folder):
                raise ModelError(f"--weights {folder} is a folder but neither a weights file nor a fine-tuned model "
                                 f"(which needs {FINETUNED_WEIGHTS} and {FINETUNED_META}); give the weights file of "
                                 f"{name}.")
            return "finetuned", folder, None
        if weights:
            _refuse_special(expand_user(weights, "weights", ModelError), "weights")
            if not os.path.lexists(expand_user(weights, "weights", ModelError)):
                raise missing_weights(weights)
            own = finetuned_dir_of(expand_user(weights, "weights", ModelError))
            if own is not None:  # a fine-tuned model's own weights file: that model, as its folder loads
                return "finetuned", own, None
        return "registry", spec, weights
    if weights:
        raise ModelError(f"--weights can only be combined with a registry model name, not with '{name}'.")
    path = expand_user(name, "model", ModelError)
    found = _model_at(path, "model", f"{path} is a folder but not a fine-tuned model: it needs "
                                     f"{FINETUNED_WEIGHTS} and {FINETUNED_META}.")
    if found is not None:
        return found
    if "/" not in name and os.sep not in name:
        candidate = paths.models_dir() / name
        _recover(candidate)
        if is_finetuned_dir(candidate):
            return "finetuned", candidate, None
        raise unknown_model_error(name)
    raise ModelError(f"Model file or folder {path} does not exist.")


def missing_weights(weights: str | os.PathLike) -> ModelError:
    """The sentence for a --weights file that is not there, naming it as resolved (relative to the folder the
    command runs in)."""
    path = os.path.abspath(expand_user(weights, "weights", ModelError))
    given = "" if str(weights) == path else f" (--weights {weights})"
    return ModelError(f"The weights file {path}{given} does not exist.")


def _locate_weights_alone(weights: str) -> tuple[str, Any, str | None]:
    """--weights without a model names a file or a fine-tuned model folder, always by its path: never a
    registry model's name or a model kept in the models folder, however bare the name."""
    path = expand_user(weights, "weights", ModelError)
    found = _model_at(path, "weights", f"--weights {path} is a folder but neither a weights file nor a fine-tuned "
                                       f"model (which needs {FINETUNED_WEIGHTS} and {FINETUNED_META}).")
    if found is None:
        raise missing_weights(weights)
    return found


def _model_at(path: Path, what: str, not_a_model: str) -> tuple[str, Any, str | None] | None:
    """The model file or fine-tuned model folder at `path` (named by the option `what`), None when nothing is
    there; a folder that is not a fine-tuned model is refused with `not_a_model`."""
    _refuse_special(path, what)
    _recover(path)
    if path.is_dir():
        if not is_finetuned_dir(path):
            raise ModelError(not_a_model)
        return "finetuned", path, None
    if path.is_file():
        folder = finetuned_dir_of(path)  # a fine-tuned model's model.safetensors: the model its folder is
        return ("finetuned", folder, None) if folder is not None else ("checkpoint", path, None)
    return None


def _recover(path: Path) -> None:
    """A training killed while it put its model in place at `path` is rolled back (its previous model back) or
    finished before the model there is read, and the user told in one sentence (the log: stderr for the CLI)."""
    try:
        said = recover_model_folder(path)
    except OSError:
        return
    if said is not None:
        log.warning("%s", said)


def check_model(model: str | None = None, weights: str | None = None) -> None:
    """Refuse what `load_model` would refuse for the model's name or files, without loading it.

    (Missing registry weights are left to `load_model`: finding them may mean a download.)
    """
    kind, where, explicit = locate_model(model, weights)
    if kind == "finetuned":
        read_finetuned_meta(where)
    elif kind == "registry" and explicit and not expand_user(explicit, "weights", ModelError).exists():
        raise missing_weights(explicit)
