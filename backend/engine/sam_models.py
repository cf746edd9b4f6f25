"""Segment Anything models for `--refine sam`: registry, weight resolution and loading.

SAM runs through the SAM classes of Hugging Face `transformers` (the optional extra `sam`):
their checkpoints are safetensors on the hub (no pickle ever), `SamModel` accepts small
configurations (tests build tiny random ones), and the package is already what the multilingual
text towers use. The registry (resources/sam_models.json) is data, like the CLIP one, and weights
are found the same way: the weights directory, the hub cache, a hub download; when none works,
the same offline message as a missing CLIP model, naming the file.

A SAM model is given as a registry name, a `.safetensors` file of the ViT-B layout, or a folder
written by `SamModel.save_pretrained` (config.json + model.safetensors, any size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import paths
from .errors import InputError, ModelError
from .files import check_regular_file
from .devices import resolve_device
from .registry import ModelSpec, _load_registry
from .weights import find_local_weights, resolve_weights

SAM_REGISTRY_FILE = "sam_models.json"
DEFAULT_SAM_MODEL = "sam-vit-b"
SAM_EXTRA_MESSAGE = "Refining outlines with SAM needs the 'sam' extra: pip install 'farslip-qgis[sam]'."


@dataclass
class LoadedSam:
    model: Any          # transformers SamModel, eval, fp32, on `device`
    name: str
    image_size: int     # side of the square input (1024 for the released models): the window side
    device: torch.device
    weights_path: str


def known_sam_models() -> dict[str, ModelSpec]:
    specs = _load_registry(str(paths.resources_dir() / SAM_REGISTRY_FILE))
    return {s.name: s for s in specs}


def _sam_classes():
    try:
        from transformers import SamConfig, SamModel
    except ImportError as exc:
        raise InputError(SAM_EXTRA_MESSAGE) from exc
    return SamConfig, SamModel


def _from_state_dict(path: Path, config) -> Any:
    from safetensors.torch import load_file

    _, SamModel = _sam_classes()
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelError(f"{path} is not a readable safetensors file ({exc}).") from exc
    model = SamModel(config)
    tied = dict(getattr(SamModel, "_tied_weights_keys", None) or {})
    for copy, source in tied.items():  # checkpoints store a tied tensor once
        if copy not in state and source in state:
            state[copy] = state[source]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ModelError(f"{path} is not a SAM ViT-B checkpoint in the transformers layout: it lacks "
                         f"{', '.join(result.missing_keys[:3])}{' ...' if len(result.missing_keys) > 3 else ''}. "
                         "Give the folder holding its config.json and model.safetensors instead.")
    return model


def _load_path(path: Path) -> Any:
    SamConfig, _ = _sam_classes()
    if path.is_dir():
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ModelError(f"{path} is a folder but not a SAM model: it needs config.json and model.safetensors.")
        try:
            config = SamConfig(**json.loads(config_file.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{config_file} is not a SAM configuration ({exc}).") from exc
        return _from_state_dict(weights, config)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path} is not a SAM model: give a .safetensors file, a folder with config.json and "
                         "model.safetensors, or a registry name (see `farslip models`).")
    return _from_state_dict(path, SamConfig())  # transformers' default SamConfig is ViT-B


def check_sam_path(path: Path) -> Path:
    """A SAM model on disk is a .safetensors file or a folder with config.json and model.safetensors,
    each a regular file: a FIFO or a device would block or never end when the job reads it."""
    if path.is_dir():
        for part in ("config.json", "model.safetensors"):
            if not (path / part).exists():
                raise ModelError(f"{path} is a folder but not a SAM model: it needs config.json and "
                                 "model.safetensors.")
            check_regular_file(path / part, "SAM model")
        return path
    check_regular_file(path, "SAM model")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path} is not a SAM model: give a .safetensors file, a folder with config.json and "
                         "model.safetensors, or a registry name (see `farslip models`).")
    return path


def sam_location(name: str | None) -> tuple[ModelSpec | None, Path | None]:
    """(registry spec, None) or (None, path) for a SAM model name, without loading anything."""
    name = name or DEFAULT_SAM_MODEL
    registry = known_sam_models()
    if name in registry:
        return registry[name], None
    path = Path(name).expanduser()
    if path.exists():
        return None, check_sam_path(path)
    raise ModelError(f"Unknown SAM model '{name}'. Known SAM models: {', '.join(registry)}; or give the path of "
                     "a SAM .safetensors file or of a folder with config.json and model.safetensors.")


def ensure_sam_weights(name: str | None = None) -> Path:
    """The SAM weights of `name`, downloaded if need be, before any long run; ModelError when unavailable."""
    spec, path = sam_location(name)
    _sam_classes()
    if spec is None:
        assert path is not None, "sam_location gives a path when the name is not a registry model"
        return path
    try:
        return resolve_weights(spec)
    except ModelError as error:
        raise ModelError(str(error).replace("--weights PATH", "--sam-model PATH")) from error


def load_sam(name: str | None = None, device: str | torch.device = "cpu") -> LoadedSam:
    """Load a SAM model by registry name or path; ModelError (exit 3) with the offline message when missing."""
    spec, _ = sam_location(name)
    path = ensure_sam_weights(name)
    dev = resolve_device(device)
    model = _load_path(path).float().eval().to(dev)
    size = model.config.vision_config.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return LoadedSam(model, spec.name if spec else path.name, size, dev, str(path))


def list_sam_models() -> list[dict]:
    """SAM registry entries for `farslip models` and GET /v1/models (kind 'sam')."""
    out = []
    for spec in known_sam_models().values():
        found = find_local_weights(spec)
        out.append({
            "name": spec.name, "arch": spec.arch, "description": spec.description, "licence": spec.licence,
            "context_length": 0, "present": found is not None, "path": str(found) if found else None,
            "loaded": False, "kind": "sam", "hf_repo": spec.hf_repo, "hf_file": spec.hf_file,
            "expected_path": str(paths.weights_dir() / spec.weights_filename),
        })
    return out
