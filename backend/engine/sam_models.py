"""Segment Anything models for `--refine sam`: registry, weight resolution and loading.

SAM runs through the SAM classes of Hugging Face `transformers` (the optional extra `sam`):
their checkpoints are safetensors on the hub (no pickle ever), `SamModel` accepts small
configurations (tests build tiny random ones), and the package is already what the multilingual
text towers use. The registry (resources/sam_models.json) is data, like the CLIP one, and weights
are found the same way: the weights directory, the hub cache, a hub download; when none works,
the same offline message as a missing CLIP model, naming the file.

A SAM model is given as a registry name, a `.safetensors` file (read with the config.json beside it,
else as ViT-B), or a folder written by `SamModel.save_pretrained` (config.json + model.safetensors, any
size). Weights that do not fit their configuration (shapes, image size, tensors of another architecture)
are refused in one sentence by `ensure_sam_weights`, which reads only the file's header, before any run.
"""

from __future__ import annotations

import json
import os
import re
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


def _sam_config(config_file: Path):
    SamConfig, _ = _sam_classes()
    try:
        return SamConfig(**json.loads(config_file.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{config_file} is not a SAM configuration ({exc}).") from exc


def _beside(path: Path) -> Path | None:
    """The config.json in the folder of a lone .safetensors file, unless it describes another kind of model."""
    config_file = path.parent / "config.json"
    if not config_file.exists():
        return None
    check_regular_file(config_file, "SAM configuration")
    try:
        kind = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "sam")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return config_file  # read as a SAM configuration, which says what is wrong with it
    return config_file if kind == "sam" else None


def _sam_parts(path: Path) -> tuple[Path, Any, Path | None]:
    """The weights file of a SAM model path, its configuration, and the config.json that gave it: a folder's,
    the one beside a lone .safetensors file, or None for a lone file read with transformers' default (ViT-B)."""
    SamConfig, _ = _sam_classes()
    if path.is_dir():
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ModelError(f"{path} is a folder but not a SAM model: it needs config.json and model.safetensors.")
        return weights, _sam_config(config_file), config_file
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path} is not a SAM model: give a .safetensors file, a folder with config.json and "
                         "model.safetensors, or a registry name (see `farslip models`).")
    beside = _beside(path)
    return path, _sam_config(beside) if beside else SamConfig(), beside


def _any_block(name: str) -> str:
    """A tensor name with every block number made 0: vision_encoder.layers.7.mlp... -> ...layers.0.mlp..."""
    return re.sub(r"\.\d+\.", ".0.", name)


def _check_fit(weights: Path, shapes: dict[str, tuple[int, ...]], config, config_file: Path | None) -> None:
    """ModelError unless the tensors of `weights` (name -> shape) fit a SamModel of `config`: none missing, each
    of its shape, no block beyond its blocks (other tensors it has no place for are left out). Checked on a
    model without memory (meta device)."""
    _, SamModel = _sam_classes()
    try:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in SamModel(config).state_dict().items()}
    except Exception as exc:  # a configuration transformers cannot build a model of
        raise ModelError(f"{config_file or 'The default SAM configuration'} is not a usable SAM configuration "
                         f"({exc}).") from exc
    shapes = dict(shapes)
    for copy, source in dict(getattr(SamModel, "_tied_weights_keys", None) or {}).items():
        if copy not in shapes and source in shapes:  # checkpoints store a tied tensor once
            shapes[copy] = shapes[source]
    wrong = [f"its {name} has shape {list(shapes[name])} where the configuration needs {list(size)}"
             for name, size in expected.items() if name in shapes and tuple(shapes[name]) != size]
    missing = [f"it lacks {name}" for name in expected if name not in shapes]
    extra = [name for name in shapes if name not in expected]
    # A block beyond the configuration's (layers.1. where it has layers.0. only) is another architecture;
    # another stray tensor (a buffer an older transformers saved) is left out when loading, as before.
    blocks = {_any_block(name) for name in expected}
    beyond = [f"it holds {name}, which the configuration has no place for" for name in extra
              if _any_block(name) in blocks]
    misfits = wrong + missing + beyond
    if not misfits:
        return
    more = f" (and {len(misfits) - 1} more tensors that do not fit)" if len(misfits) > 1 else ""
    if config_file is None:
        raise ModelError(f"The weights in {weights} do not fit the SAM configuration a lone .safetensors file is "
                         f"read with (ViT-B, in the transformers layout): {misfits[0]}{more}; for another SAM "
                         "(a ViT-L or ViT-H checkpoint, a smaller one) put its config.json beside the file, or give "
                         "the folder holding its config.json and model.safetensors.")
    raise ModelError(f"The weights in {weights} do not fit the SAM configuration in {config_file}: {misfits[0]}"
                     f"{more}; give the config.json these weights were saved with (SamModel.save_pretrained "
                     "writes both into one folder).")


def _header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:
        raise ModelError(f"{weights} is not a readable safetensors file ({exc}).") from exc


def check_sam_fit(path: Path) -> None:
    """ModelError (one sentence) unless the SAM model at `path` (a file or a folder) loads: its configuration
    reads and its weights fit it. Reads the configuration and the weights' header only, so it is cheap
    enough to run before a long run."""
    weights, config, config_file = _sam_parts(path)
    _check_fit(weights, _header_shapes(weights), config, config_file)


def _load_path(path: Path) -> Any:
    from safetensors.torch import load_file

    _, SamModel = _sam_classes()
    weights, config, config_file = _sam_parts(path)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:
        raise ModelError(f"{weights} is not a readable safetensors file ({exc}).") from exc
    _check_fit(weights, {name: tuple(t.shape) for name, t in state.items()}, config, config_file)
    model = SamModel(config)
    tied = dict(getattr(SamModel, "_tied_weights_keys", None) or {})
    for copy, source in tied.items():  # checkpoints store a tied tensor once
        if copy not in state and source in state:
            state[copy] = state[source]
    model.load_state_dict({name: tensor for name, tensor in state.items() if name in model.state_dict()}, strict=True)
    return model


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
    if (path.parent / "config.json").exists():  # read with the file
        check_regular_file(path.parent / "config.json", "SAM configuration")
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
    if "/" in name or os.sep in name or name.startswith("~") or name.endswith(".safetensors"):
        raise ModelError(f"SAM model file or folder {path} does not exist.")
    raise ModelError(f"Unknown SAM model '{name}'. Known SAM models: {', '.join(registry)}; or give the path of "
                     "a SAM .safetensors file or of a folder with config.json and model.safetensors.")


def resolve_sam_weights(spec: ModelSpec) -> Path:
    """A registry SAM model's weights file (found, or downloaded); the offline sentence names --sam-model,
    the option that takes a SAM file, not --weights."""
    try:
        return resolve_weights(spec)
    except ModelError as error:
        raise ModelError(str(error).replace("--weights PATH", "--sam-model PATH")) from error


def ensure_sam_weights(name: str | None = None) -> Path:
    """The SAM weights of `name`, downloaded if need be, before any long run; ModelError when unavailable or
    when they do not fit their configuration (checked from the file's header: nothing is loaded)."""
    spec, path = sam_location(name)
    _sam_classes()
    if spec is None:
        assert path is not None, "sam_location gives a path when the name is not a registry model"
    else:
        path = resolve_sam_weights(spec)
    check_sam_fit(path)
    return path


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
