"""Where the backend keeps state, caches and weights (overridable by env vars)."""

from __future__ import annotations

import os
from pathlib import Path


def _env_dir(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else default


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
