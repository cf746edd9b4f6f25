"""Checkpoint files -> open_clip CLIP models, rebuilt from tensor shapes alone.

Every checkpoint (FarSLIP1/2, OpenAI CLIP, GeoRSCLIP, RemoteCLIP, the project's own fine-tuned
models) goes through the same code: read the tensors (never unpickling code:
``torch.load(..., weights_only=True)`` or safetensors), normalise the keys, infer the open_clip
ViT configuration from the shapes, build and load.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
import re
from pathlib import Path
from typing import Any

import torch

from backend.engine.files import expand_user
from backend.engine.errors import ModelError
from backend.engine.registry import (
    ACTIVATIONS,
    DEFAULT_ACTIVATION,
)

# LongCLIP "knowledge-preserved stretching": positions below this come from
# `positional_embedding`, the others from `positional_embedding_res`.
LONGCLIP_KEEP = 20


# Keys some exporters (OpenAI's JIT state dict) carry that are not parameters.
_NON_PARAM_KEYS = {"input_resolution", "context_length", "vocab_size", "mask1", "mask2"}


def _unwrap(obj: Any, path: Path) -> dict:
    for _ in range(3):
        if isinstance(obj, dict):
            for key in ("state_dict", "model", "module"):
                inner = obj.get(key)
                if isinstance(inner, dict) and inner:
                    obj = inner
                    break
            else:
                return obj
        else:
            break
    if not isinstance(obj, dict):
        raise ModelError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    return obj


def fold_longclip_positional(sd: dict[str, torch.Tensor], keep: int = LONGCLIP_KEEP) -> dict:
    """Fold LongCLIP's `positional_embedding` + `positional_embedding_res` into one embedding.

    Effective position i is pos[i] for i < keep and pos_res[i] otherwise; the
    result has pos_res's length (248 in FarSLIP2 / LongCLIP).
    """
    if "positional_embedding_res" not in sd:
        return sd
    pos = sd.get("positional_embedding")
    res = sd.pop("positional_embedding_res")
    if pos is None or pos.ndim != 2 or res.ndim != 2 or pos.shape[1] != res.shape[1] \
            or res.shape[0] < min(keep, pos.shape[0]) or pos.shape[0] > res.shape[0]:
        raise ModelError(
            "The checkpoint's LongCLIP text positional embeddings have unexpected shapes "
            f"(positional_embedding {tuple(pos.shape) if pos is not None else None}, "
            f"positional_embedding_res {tuple(res.shape)}).")
    k = min(keep, pos.shape[0])
    folded = res.clone()
    folded[:k] = pos[:k]
    sd["positional_embedding"] = folded
    return sd


def _starts_like_pickle(path: Path) -> bool:
    """A legacy torch.save file begins with a pickle protocol marker (0x80, protocol 2..5)."""
    with open(path, "rb") as stream:
        head = stream.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _starts_like_safetensors(path: Path) -> bool:
    """A safetensors file begins with its header's length (8 bytes, little-endian) and the header's JSON '{'."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= path.stat().st_size - 8


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file as an fp32 open_clip state dict (no pickled code ever runs).

    Accepts `.safetensors`, plain torch state dicts and training checkpoints
    (`state_dict` / `model` entry, `module.` prefixes, fp16), and folds
    FarSLIP2/LongCLIP split text positional embeddings.
    """
    return fold_longclip_positional(read_tensors(path))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (fp32, prefixes stripped, LongCLIP embeddings not folded)."""
    path = expand_user(path, "checkpoint", ModelError)
    if not path.is_file():
        raise ModelError(f"Checkpoint file {path} does not exist.")
    # What the file is, by its content (a safetensors file saved under the registry's .pt name is one).
    safetensors = path.suffix.lower() == ".safetensors" or (not zipfile.is_zipfile(path)
                                                            and _starts_like_safetensors(path))
    if not zipfile.is_zipfile(path) and not safetensors and not _starts_like_pickle(path):
        raise ModelError(f"{path} is not a readable PyTorch checkpoint (neither a complete zip archive, a pickle nor "
                         "safetensors); is it the right file, and is the download complete?")
    if safetensors:
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc}).") from exc
    else:
        try:
            with warnings.catch_warnings():  # torch words its refusal as a warning too; ours is the sentence
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ModelError(
                f"Refusing to load {path}: it contains Python objects or code besides tensors, and "
                "loading it could run that code. Use a plain state dict, a FarSLIP/open_clip "
                "checkpoint or a .safetensors file.") from exc
        except Exception as exc:  # truncated/corrupt/not a torch file
            raise ModelError(
                f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}). "
                "Is the download complete?") from exc
    raw = _unwrap(obj, path)
    sd: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor) or not isinstance(key, str):
            continue
        while key.startswith("module."):
            key = key[len("module."):]
        if key in _NON_PARAM_KEYS:
            continue
        sd[key] = value.float() if value.is_floating_point() else value
    if not sd:
        raise ModelError(f"{path} holds no tensors: it is not a model checkpoint.")
    damaged = [key for key, value in sd.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        raise ModelError(f"{path} holds NaN or infinite weights ({len(damaged)} tensor(s), e.g. {damaged[0]}): the "
                         "checkpoint is damaged or its training diverged. Use another checkpoint.")
    return sd


def _count_layers(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def infer_vision_cfg(sd: dict[str, torch.Tensor]) -> dict:
    """open_clip ViT image-tower config from a state dict's shapes."""
    if any(k.startswith("visual.trunk.") for k in sd):
        raise ModelError("This checkpoint uses a timm image tower; only open_clip ViT CLIP models are supported.")
    if "visual.conv1.weight" not in sd:
        kind = "a ResNet CLIP" if any(k.startswith("visual.layer1.") for k in sd) else "not an open_clip CLIP"
        raise ModelError(f"This checkpoint is {kind} model; only open_clip ViT CLIP checkpoints are supported.")
    missing = [k for k in ("visual.positional_embedding", "visual.proj") if k not in sd]
    if missing:
        raise ModelError(f"This checkpoint lacks tensors a CLIP model needs: {', '.join(missing)}.")
    conv = sd["visual.conv1.weight"]
    vwidth, _, ph, pw = conv.shape
    if ph != pw:
        raise ModelError(f"Non-square patches ({ph}x{pw}) are not supported.")
    n_tok = sd["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(n_tok)
    if grid * grid != n_tok:
        raise ModelError(f"The image positional embedding ({n_tok} patches) is not a square grid.")
    vlayers = _count_layers(sd, "visual.transformer.resblocks.")
    vfc = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    return {
        "image_size": int(grid * ph), "patch_size": int(ph), "width": int(vwidth), "layers": vlayers,
        "head_width": 64 if vwidth % 64 == 0 else int(vwidth),
        "mlp_ratio": float(vfc.shape[0]) / vwidth if vfc is not None else 4.0,
        "no_ln_pre": "visual.ln_pre.weight" not in sd,
    }


def infer_architecture(sd: dict[str, torch.Tensor]) -> dict:
    """open_clip CLIP config (embed_dim, vision_cfg, text_cfg) from a state dict's shapes."""
    vision_cfg = infer_vision_cfg(sd)
    need = ["token_embedding.weight", "positional_embedding", "text_projection"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ModelError(f"This checkpoint lacks tensors a CLIP model needs: {', '.join(missing)}.")
    tlayers = _count_layers(sd, "transformer.resblocks.")
    embed_dim = int(sd["visual.proj"].shape[1])
    vocab, twidth = sd["token_embedding.weight"].shape
    if sd["text_projection"].shape[-1] != embed_dim:
        raise ModelError("The text and image projections of this checkpoint have different sizes.")
    tfc = sd.get("transformer.resblocks.0.mlp.c_fc.weight")
    text_cfg = {
        "context_length": int(sd["positional_embedding"].shape[0]), "vocab_size": int(vocab),
        "width": int(twidth), "heads": max(1, int(twidth) // 64), "layers": tlayers,
        "mlp_ratio": float(tfc.shape[0]) / twidth if tfc is not None else 4.0,
    }
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def describe_architecture(cfg: dict) -> dict:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {
        "patch_size": v["patch_size"], "image_size": v["image_size"], "vision_width": v["width"],
        "vision_layers": v["layers"], "text_width": t["width"], "text_layers": t["layers"],
        "context_length": t["context_length"], "vocab_size": t["vocab_size"], "embed_dim": cfg["embed_dim"],
    }


def model_from_state_dict(sd: dict[str, torch.Tensor], activation: str = DEFAULT_ACTIVATION):
    """Build an open_clip CLIP (eval, fp32, CPU) whose shapes match `sd`, with `activation`, and load it."""
    from open_clip.model import CLIP

    assert activation in ACTIVATIONS, activation
    cfg = infer_architecture(sd)
    model = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=activation == "quickgelu")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in ("logit_bias",)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if result.unexpected_keys:
            unexp = result.unexpected_keys
            parts.append(f"unexpected {', '.join(unexp[:5])}{' ...' if len(unexp) > 5 else ''}")
        raise ModelError("The checkpoint does not match an open_clip ViT CLIP model: " + "; ".join(parts) + ".")
    return model.float().eval()
