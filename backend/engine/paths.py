"""Where the backend keeps state, caches and weights (overridable by env vars)."""

from __future__ import annotations

import os
from pathlib import Path


FOLDER_HINTS = {"FARSLIP_WEIGHTS": " (or leave it unset and pass the file itself with --weights)"}


def _env_dir(var: str, default: Path) -> Path:
    """The folder an environment variable names, else `default`; a variable that names a file is a sentence
    (the weights were then looked for 'in' the file: put X at FILE/X, advice no one can follow)."""
    value = os.environ.get(var)
    if not value:
        return default
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        from .errors import InputError

        raise InputError(f"{var} names the file {folder}; it must name a folder: set it to {folder.parent}"
                         f"{FOLDER_HINTS.get(var, '')}.")
    return folder


def state_dir() -> Path:
    """Job history, logs, connection file, fine-tuned models ($FARSLIP_HOME)."""
    xdg = _env_dir("XDG_DATA_HOME", Path.home() / ".local" / "share")
    return _env_dir("FARSLIP_HOME", xdg / "farslip")


def cache_dir() -> Path:
    """Text-embedding cache ($FARSLIP_CACHE)."""
    xdg = _env_dir("XDG_CACHE_HOME", Path.home() / ".cache")
    return _env_dir("FARSLIP_CACHE", xdg / "farslip")


def weights_dir() -> Path:
    """A folder of checkpoint files named as in the model registry ($FARSLIP_WEIGHTS)."""
    return _env_dir("FARSLIP_WEIGHTS", state_dir() / "weights")


def models_dir() -> Path:
    """Fine-tuned model directories written by `farslip train` ($FARSLIP_MODELS)."""
    return _env_dir("FARSLIP_MODELS", state_dir() / "models")


def resources_dir() -> Path:
    """The repository's resources/ folder (model registry, class palette, presets, templates, icons)."""
    return Path(__file__).resolve().parents[2] / "resources"
