"""Loading a model: a registry name, a checkpoint file or a fine-tuned folder -> LoadedModel.

`locate_model` decides where a model comes from without reading weights (the server's quick
check); `load_model` reads and builds it on a device. The parts live beside this module:
registry (names), weights (finding, downloading, hashing), checkpoints (tensors -> CLIP),
finetuned (the fine-tuned folder format), devices.

The registry is data (``resources/models.json``).  Weights are found, in this
order: an explicit ``--weights PATH``; the weights directory
(``$FARSLIP_WEIGHTS``, see :func:`backend.engine.paths.weights_dir`); the Hugging Face
hub cache (downloading into it when online).  A missing file is one clear
:class:`ModelError`; there is never a silent fallback to other weights.

Every checkpoint is rebuilt from its tensor shapes alone (open_clip ViT CLIP,
head width 64), so FarSLIP1/2, OpenAI CLIP, GeoRSCLIP, RemoteCLIP and the
project's own fine-tuned models all go through the same code path. The MLP
activation cannot be read from the tensors: it is a registry field
(`activation`: QuickGELU for OpenAI CLIP and FarSLIP, plain GELU for GeoRSCLIP
and RemoteCLIP, as RS-OVSS runs them), recorded in a fine-tuned model's
farslip_model.json, taken from the registry entry whose file name a checkpoint
file has, and QuickGELU (the OpenAI CLIP lineage) for any other checkpoint.
A fine-tuned folder's own model.safetensors, given as a file, is that folder's model
(finetuned.finetuned_dir_of), never a bare checkpoint that would drop its description.
Loading never unpickles code: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from backend.engine import paths
from backend.engine.checkpoints import (
    describe_architecture,
    infer_architecture,
    infer_vision_cfg,
    model_from_state_dict,
    read_state_dict,
)
from backend.engine.devices import resolve_device
from backend.engine.errors import InputError, ModelError
from backend.engine.finetuned import (
    FINETUNED_META,
    FINETUNED_WEIGHTS,
    finetuned_dirs,
    read_finetuned_meta,
)
from backend.engine.registry import (
    ACTIVATIONS,
    DEFAULT_ACTIVATION,
    ModelSpec,
    known_models,
)
from backend.engine.model_location import (  # torch-free; their names stay importable from here
    check_model as check_model,
    locate_model,
    missing_weights as missing_weights,
    unknown_model_error as unknown_model_error,
    unusable_finetuned as unusable_finetuned,
)
from backend.engine.weights import (
    file_sha256,
    find_local_weights,
    resolve_weights,
)


@dataclass
class LoadedModel:
    model: Any  # open_clip.model.CLIP, eval mode, fp32, on `device`
    name: str
    tokenizer: Any  # open_clip's (BPE or Hugging Face): tokenizer(texts) -> (N, context) ids; .encode/.decode
    context_length: int
    weights_id: str
    class_lines: list[str] | None = None
    metadata: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


log = logging.getLogger("farslip.models")


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77):
    """open_clip's CLIP BPE tokenizer padding/truncating to `context_length` (77 or 248)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def spec_patch(spec: ModelSpec) -> int | None:
    """The patch size a registry model's architecture names (ViT-B-16: 16)."""
    m = re.search(r"-(\d+)$", spec.arch)
    return int(m.group(1)) if m else None


def _check_spec(spec: ModelSpec, cfg: dict, path: Path) -> None:
    patch = spec_patch(spec)
    got_patch = cfg["vision_cfg"]["patch_size"]
    got_ctx = cfg["text_cfg"]["context_length"]
    if (patch is not None and got_patch != patch) or got_ctx != spec.context_length:
        raise ModelError(
            f"{path} is a patch-{got_patch}, {got_ctx}-token checkpoint, but model '{spec.name}' is "
            f"{spec.arch} with {spec.context_length} tokens. Use the matching --model, or give the "
            "file itself as the model.")


def _finish_hf_text(sd: dict, *, name: str, weights_path: Path, dev: torch.device,
                    class_lines: list[str] | None, metadata: dict, spec: ModelSpec | None,
                    activation: str) -> LoadedModel:
    """A CLIP with a Hugging Face text tower (hf_text.py): tower files found like weights."""
    from . import hf_text
    from .options import LANGUAGES

    folder = weights_path.parent
    config = hf_text.read_open_clip_config(folder)
    text_cfg = config["text_cfg"] if config else {}
    tower_name = (spec.text_tower if spec is not None else None) or str(text_cfg.get("hf_model_name") or "")
    tower_name = tower_name or str(metadata.get("finetuned", {}).get("text_tower") or "xlm-roberta-base")
    repos = [spec.hf_repo] if spec is not None else []
    found = hf_text.find_text_tower(tower_name, [folder], repos)
    tower = hf_text.tower_from_config(text_cfg, tower_name, found)
    vision_cfg = config["vision_cfg"] if config else infer_vision_cfg(sd)
    if spec is not None and spec_patch(spec) not in (None, vision_cfg["patch_size"]):
        # The image side of _check_spec (the text tower's context comes with the tower, not the file).
        raise ModelError(f"{weights_path} is a patch-{vision_cfg['patch_size']} checkpoint, but model '{spec.name}' "
                         f"is {spec.arch}. Use the matching --model, or give the file itself as the model.")
    if spec is None and not metadata.get("finetuned"):
        # A bare checkpoint: open_clip's Hugging Face-tower models (xlm-roberta-*-ViT-*) use plain GELU
        # unless their open_clip_config.json says quick_gelu.
        activation = "quickgelu" if (config or {}).get("quick_gelu") else "gelu"
    model = hf_text.build_hf_clip(sd, vision_cfg, tower, quick_gelu=activation == "quickgelu").to(dev)
    if spec is not None and spec.languages:
        languages = list(spec.languages)
    else:  # a checkpoint: multilingual when its tower is (XLM-R, multilingual BERT)
        kind = str(getattr(model.text.config, "model_type", ""))
        multi = kind.startswith("xlm") or "multilingual" in tower_name.lower()
        languages = list(LANGUAGES) if multi else ["en"]
    meta = {"weights_path": str(weights_path),
            "text_tower": {"name": tower.name, "config": str(tower.config_folder),
                           "tokenizer": str(tower.tokenizer_folder)},
            "languages": languages, "activation": activation,
            "architecture": {"patch_size": vision_cfg["patch_size"], "image_size": vision_cfg["image_size"],
                             "vision_width": vision_cfg["width"], "vision_layers": vision_cfg["layers"],
                             "text_tower": tower.name, "context_length": tower.context_length},
            **metadata}
    return LoadedModel(model=model, name=name, tokenizer=hf_text.hf_tokenizer(tower),
                       context_length=tower.context_length, weights_id=file_sha256(weights_path),
                       class_lines=class_lines, metadata=meta, device=dev)


def _finish(sd: dict, *, name: str, weights_path: Path, device: str | torch.device,
            class_lines: list[str] | None, metadata: dict, activation: str = DEFAULT_ACTIVATION,
            spec: ModelSpec | None = None) -> LoadedModel:
    from .hf_text import is_hf_text_state_dict

    dev = resolve_device(device)
    if is_hf_text_state_dict(sd):
        return _finish_hf_text(sd, name=name, weights_path=weights_path, dev=dev, class_lines=class_lines,
                               metadata=metadata, spec=spec, activation=activation)
    cfg = infer_architecture(sd)
    if spec is not None:
        _check_spec(spec, cfg, weights_path)
    model = model_from_state_dict(sd, activation).to(dev)
    ctx = cfg["text_cfg"]["context_length"]
    meta = {"weights_path": str(weights_path), "architecture": describe_architecture(cfg),
            "languages": list(spec.languages) if spec is not None and spec.languages else ["en"],
            "activation": activation, **metadata}
    return LoadedModel(model=model, name=name, tokenizer=get_tokenizer(ctx), context_length=ctx,
                       weights_id=file_sha256(weights_path), class_lines=class_lines,
                       metadata=meta, device=dev)


def _load_finetuned(path: Path, device) -> LoadedModel:
    meta = read_finetuned_meta(path)
    weights = path / FINETUNED_WEIGHTS
    sd = read_state_dict(weights)
    name = str(meta.get("name") or path.name)
    activation = str(meta.get("activation") or DEFAULT_ACTIVATION)
    if activation not in ACTIVATIONS:
        raise ModelError(f"{path / FINETUNED_META}: 'activation' must be one of {', '.join(ACTIVATIONS)}; "
                         f"got {activation!r}.")
    return _finish(sd, name=name, weights_path=weights, device=device, activation=activation,
                   class_lines=list(meta["class_lines"]) if meta.get("class_lines") else None,
                   metadata={"kind": "finetuned", "model_dir": str(path), "finetuned": meta})


def load_model(model: str | None = None, weights: str | None = None, device: str | torch.device = "cpu",
               half: bool = False) -> LoadedModel:
    """Load a registry model, a checkpoint file or a fine-tuned model directory.

    `weights` (``--weights``) overrides where a registry model's weights come
    from; with no `model` it names the checkpoint to load directly. `half` (``--half``): in fp16.
    """
    if half:
        check_half(half, torch.device(device))
        return to_half(load_model(model, weights, device))
    kind, where, explicit = locate_model(model, weights)
    if kind == "finetuned":
        return _load_finetuned(where, device)
    if kind == "checkpoint":
        loaded = _finish(read_state_dict(where), name=where.stem, weights_path=where, device=device,
                         class_lines=None, activation=checkpoint_activation(where),
                         metadata={"kind": "checkpoint"})
        loaded.name = checkpoint_name(where, loaded.weights_id)
        return loaded
    path = resolve_weights(where, explicit)
    return _finish(read_state_dict(path), name=where.name, weights_path=path, device=device,
                   class_lines=None, spec=where, activation=where.activation,
                   metadata={"kind": "registry", "spec": asdict(where)})


def checkpoint_name(path: Path, sha256: str) -> str:
    """The name of a checkpoint file given by path (the polygons' `model` field, GET /v1/health's loaded_model):
    its file name without the extension, unless that is a registry model's name and the file holds other weights
    than that model's on this computer (a different file and another sha256): then its whole file name
    (clip-vit-b-16.safetensors), which no registry model has, so results never name a model they were not
    made with."""
    spec = {name.lower(): spec for name, spec in known_models().items()}.get(path.stem.lower())
    if spec is None:
        return path.stem
    local = find_local_weights(spec)
    if local is not None and (_same_file(local, path) or file_sha256(local) == sha256):
        return spec.name
    return path.name


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def loaded_identity(loaded: LoadedModel) -> dict:
    """What a loaded model is, as GET /v1/models says it: its name, kind (registry, finetuned, checkpoint), the
    path it was read from (a fine-tuned model's folder, else its weights file) and the weights' sha256."""
    meta = loaded.metadata
    kind = str(meta.get("kind") or "checkpoint")
    path = meta.get("model_dir") if kind == "finetuned" else meta.get("weights_path")
    return {"name": loaded.name, "kind": kind, "path": str(path) if path else None,
            "weights_sha256": loaded.weights_id}


def is_loaded(entry: dict, identity: dict | None) -> bool:
    """Whether a list_models entry is the loaded model (`identity`, loaded_identity's answer), by what it is, not
    by name: a fine-tuned model by its folder; a registry model when it was loaded by its name, or when its
    weights file on this computer is the file loaded. A checkpoint whose file name is a model's name is none of
    them; nor is a fine-tuned folder elsewhere named like one in the models folder."""
    if identity is None or not identity.get("path"):
        return False
    if entry.get("kind") == "finetuned":
        return identity["kind"] == "finetuned" and bool(entry.get("path")) and _same_file(entry["path"],
                                                                                           identity["path"])
    if entry.get("kind") != "registry":
        return False
    if identity["kind"] == "registry" and identity["name"] == entry.get("name"):
        return True
    return identity["kind"] == "checkpoint" and bool(entry.get("path")) and _same_file(entry["path"],
                                                                                      identity["path"])


def checkpoint_activation(path: Path) -> str:
    """The activation of a checkpoint given by path: its registry entry's when the file name is a
    registry model's (e.g. RS5M_ViT-B-32.pt is GeoRSCLIP: GELU), else QuickGELU."""
    names = {path.name.lower()}
    for spec in known_models().values():
        if spec.weights_filename.lower() in names or PurePosixPath(spec.hf_file).name.lower() in names:
            return spec.activation
    return DEFAULT_ACTIVATION


def check_half(half: bool, device: torch.device) -> None:
    """--half is for parity runs on a CUDA GPU; on a CPU the engine stays fp32."""
    if half and device.type != "cuda":
        raise InputError(f"--half (fp16 weights and inputs, as the RS-OVSS evaluation runs) needs a CUDA GPU; "
                         f"this run is on {device.type}, where models run in fp32. Drop --half, or use "
                         "--device cuda on a machine with an NVIDIA GPU.")


def to_half(loaded: LoadedModel) -> LoadedModel:
    """The model in fp16 as open_clip's precision='fp16' makes it (RS-OVSS's evaluation): linear,
    convolution, attention and projection weights fp16, layer norms computed in fp32."""
    from open_clip.model import convert_weights_to_lp
    from open_clip.transformer import LayerNorm, LayerNormFp32

    convert_weights_to_lp(loaded.model, dtype=torch.float16)
    for module in loaded.model.modules():
        if type(module) is LayerNorm:
            module.__class__ = LayerNormFp32  # same parameters; computes in fp32 and casts back
    loaded.metadata["precision"] = "fp16"
    return loaded


def list_models() -> list[dict]:
    """Registry models (present or not) and fine-tuned model folders, as in GET /v1/models."""
    out = []
    for spec in known_models().values():
        found = find_local_weights(spec)
        out.append({
            "name": spec.name, "arch": spec.arch, "description": spec.description, "licence": spec.licence,
            "context_length": spec.context_length, "present": found is not None,
            "path": str(found) if found else None, "loaded": False, "kind": "registry",
            "hf_repo": spec.hf_repo, "hf_file": spec.hf_file,
            "expected_path": str(paths.weights_dir() / spec.weights_filename),
            "languages": list(spec.languages or ["en"]), "multilingual": bool(spec.languages),
        })
    registry = known_models()
    for d in finetuned_dirs():
        try:
            meta = read_finetuned_meta(d)
        except ModelError:
            continue
        base = registry.get(str(meta.get("base_model", "")))
        out.append({
            "name": d.name,
            "arch": str(meta.get("arch") or (base.arch if base else "")),
            "description": str(meta.get("description")
                               or f"Fine-tuned from {meta.get('base_model', 'unknown')} "
                                  f"({len(meta.get('class_lines') or [])} classes)"),
            "licence": str(meta.get("licence") or (base.licence if base else "")),
            "context_length": int(meta.get("context_length") or (base.context_length if base else 77)),
            "present": True, "path": str(d), "loaded": False, "kind": "finetuned",
            "languages": list(meta.get("languages") or ["en"]),
            "multilingual": len(meta.get("languages") or ["en"]) > 1,
        })
    return out
