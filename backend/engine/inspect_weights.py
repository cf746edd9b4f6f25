"""`farslip models --inspect`: what a weights file holds, checked against the registry.

The FarSLIP release's README and the RS-OVSS evaluation code disagree on which
file has the 77-token CLIP text tower and which the 248-token LongCLIP one, so
the registry is checked against the tensors: the text positional embedding(s)
decide the context length, the image positional embedding the patch grid.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ModelError
from .files import expand_user
from .checkpoints import LONGCLIP_KEEP, infer_vision_cfg, read_tensors
from .finetuned import FINETUNED_WEIGHTS, read_finetuned_meta
from .models import check_model, checkpoint_activation, locate_model
from .weights import find_local_weights, missing_weights_message

SHAPE_KEYS = ("positional_embedding", "positional_embedding_res", "visual.positional_embedding",
              "visual.conv1.weight", "token_embedding.weight", "text_projection", "visual.proj")


def inspect_model(model: str, weights: str | None = None) -> dict:
    """Shapes that decide a model's text context and patch grid, and whether the registry agrees.

    Never downloads: a registry model must already be on this computer (or `weights`, --weights, names its file).
    """
    from .sam_models import known_sam_models

    if model in known_sam_models():  # listed by `farslip models` beside the CLIP models
        raise ModelError(f"{model} is a SAM model (for segment --refine sam); --inspect reads the CLIP models' "
                         "files (text context, patch grid). `farslip models` says whether its weights are here.")
    check_model(model, weights)  # a --weights file that is not there: load_model's sentence
    kind, where, explicit = locate_model(model, weights)
    spec = where if kind == "registry" else None
    if kind == "registry":
        assert spec is not None
        path = expand_user(explicit, "weights", ModelError) if explicit else find_local_weights(spec)
        if path is None:
            raise ModelError(missing_weights_message(spec, "--inspect only reads files already on this computer."))
        activation = spec.activation
    elif kind == "finetuned":
        path = where / FINETUNED_WEIGHTS
        activation = str(read_finetuned_meta(where).get("activation") or "quickgelu")
    else:
        path = where
        activation = checkpoint_activation(where)
    tensors = read_tensors(path)
    try:
        infer_vision_cfg(tensors)  # the loader's own check: an open_clip ViT CLIP, or its sentence
    except ModelError as error:
        raise ModelError(f"{Path(path).name}: {error}") from None
    shapes = {key: list(tensors[key].shape) for key in SHAPE_KEYS if key in tensors}
    longclip = "positional_embedding_res" in tensors
    text_key = "positional_embedding_res" if longclip else "positional_embedding"
    context = int(tensors[text_key].shape[0]) if text_key in tensors else None
    patch = int(tensors["visual.conv1.weight"].shape[-1]) if "visual.conv1.weight" in tensors else None
    grid = None
    if "visual.positional_embedding" in tensors:
        grid = math.isqrt(tensors["visual.positional_embedding"].shape[0] - 1)
    info = {"model": model, "kind": kind, "path": str(path), "shapes": shapes, "longclip": longclip,
            "context_length": context, "patch_size": patch, "image_grid": grid,
            "image_size": grid * patch if grid and patch else None, "activation": activation,
            "registry": None, "agrees": None}
    if spec is not None:
        info["registry"] = {"name": spec.name, "arch": spec.arch, "context_length": spec.context_length,
                            "activation": spec.activation}
        info["agrees"] = (context is None or context == spec.context_length) and \
            (patch is None or spec.arch.endswith(f"-{patch}"))
    return info


def format_inspection(info: dict) -> str:
    lines = [f"{info['model']}: {info['path']}"]
    for key, shape in info["shapes"].items():
        lines.append(f"  {key:<28} {' x '.join(str(n) for n in shape)}")
    if info["context_length"] is None:
        text = "not CLIP's own text tower (e.g. XLM-RoBERTa): its tokenizer sets the context"
    elif info["longclip"]:
        text = (f"LongCLIP text tower: positional_embedding + positional_embedding_res, folded at load "
                f"time (positions < {LONGCLIP_KEEP} from the first), {info['context_length']} tokens")
    else:
        text = f"stock CLIP text tower, {info['context_length']} tokens"
    lines.append(f"text context: {text}")
    if info["image_size"]:
        lines.append(f"image: patch {info['patch_size']}, {info['image_grid']} x {info['image_grid']} grid, "
                     f"input {info['image_size']} px")
    lines.append(f"activation used: {info['activation']}")
    registry = info["registry"]
    if registry is not None:
        if info["agrees"] and info["context_length"] is None:
            lines.append(f"registry entry '{registry['name']}' ({registry['arch']}) agrees with the file's patch "
                         "size.")
        elif info["agrees"]:
            lines.append(f"registry entry '{registry['name']}' ({registry['arch']}, {registry['context_length']} "
                         "tokens) agrees with the file's patch size and text context.")
        else:
            says = f"{registry['arch']} with {registry['context_length']} tokens"
            has = f"patch {info['patch_size']} and {info['context_length']} tokens"
            if info["context_length"] is None:  # a Hugging Face text tower: its tokenizer sets the context
                says, has = registry["arch"], f"patch {info['patch_size']}"
            lines.append(f"registry entry '{registry['name']}' says {says}, but the file has {has}: the registry is "
                         "wrong for this file (loading it under this name is refused; load it by path instead).")
    return "\n".join(lines)

