"""The model registry: named models, their architecture, activation, licence and weight files.

The registry is data (``resources/models.json``), read once per file.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backend.engine import paths
from backend.engine.errors import ModelError

DEFAULT_MODEL = "farslip2-vit-b-16"


REGISTRY_FILE = "models.json"


ACTIVATIONS = ("quickgelu", "gelu")


DEFAULT_ACTIVATION = "quickgelu"  # OpenAI CLIP and everything fine-tuned from it, FarSLIP included


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    hf_repo: str
    hf_file: str
    context_length: int
    licence: str
    description: str
    # File name expected in the weights directory when the hub file's base name
    # is ambiguous (OpenAI CLIP B/16 and B/32 are both `open_clip_model.safetensors`).
    local_file: str | None = None
    # Hugging Face text tower (e.g. xlm-roberta-base) for models whose text side is not CLIP's own.
    text_tower: str | None = None
    # Languages the text tower was trained on (ISO 639-1); None means English only.
    languages: tuple[str, ...] | None = None
    # MLP activation the weights were trained with: "quickgelu" (OpenAI CLIP, FarSLIP) or "gelu".
    activation: str = DEFAULT_ACTIVATION

    @property
    def weights_filename(self) -> str:
        """The file name to put in the weights directory."""
        return self.local_file or PurePosixPath(self.hf_file).name

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file}"


@functools.lru_cache(maxsize=4)
def _load_registry(path: str) -> tuple[ModelSpec, ...]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = set(ModelSpec.__dataclass_fields__)
        specs = []
        for m in data["models"]:
            values = {k: v for k, v in m.items() if k in fields}
            if values.get("languages") is not None:
                values["languages"] = tuple(values["languages"])
            specs.append(ModelSpec(**values))
        bad = [s.name for s in specs if s.activation not in ACTIVATIONS]
        if bad:
            raise ValueError(f"activation of {', '.join(bad)} must be one of {', '.join(ACTIVATIONS)}")
        return tuple(specs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"The model registry {path} is unreadable ({exc}). Reinstall the project.") from exc


def known_models() -> dict[str, ModelSpec]:
    """The registry from resources/models.json, by name (default model first)."""
    specs = _load_registry(str(paths.resources_dir() / REGISTRY_FILE))
    return {s.name: s for s in specs}
