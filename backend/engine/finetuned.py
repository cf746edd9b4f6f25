"""The fine-tuned model format: a folder with model.safetensors and farslip_model.json.

Training writes it (training/api.py) and the engine reads it; both use the names and checks here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backend.engine import paths
from backend.engine.errors import ModelError

FINETUNED_FORMAT = "farslip-finetuned/1"


FINETUNED_WEIGHTS = "model.safetensors"


FINETUNED_META = "farslip_model.json"


def is_finetuned_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / FINETUNED_WEIGHTS).is_file() and (p / FINETUNED_META).is_file()


def read_finetuned_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / FINETUNED_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_file} is unreadable ({exc}).") from exc
    fmt = str(meta.get("format", "")) if isinstance(meta, dict) else ""
    if not fmt.startswith("farslip-finetuned/"):
        raise ModelError(f"{meta_file} is not a FarSLIP fine-tuned model description "
                         f"(format '{fmt}', expected '{FINETUNED_FORMAT}').")
    lines = meta.get("class_lines")
    if lines is not None and not (isinstance(lines, list) and all(isinstance(s, str) for s in lines)):
        raise ModelError(f"{meta_file}: 'class_lines' must be a list of strings.")
    return meta


def finetuned_dirs() -> list[Path]:
    root = paths.models_dir()
    try:
        return sorted(p for p in root.iterdir() if is_finetuned_dir(p))
    except OSError:
        return []
