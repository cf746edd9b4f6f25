"""Tiny randomly initialised open_clip models, built and saved by the tests themselves.

Shapes follow open_clip's conventions (head width 64, QuickGELU) so that the
backend's loader can infer the architecture from tensor shapes alone, just as
it does for real FarSLIP / CLIP checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.model import CLIP


def make_tiny_clip(patch_size: int = 16, context_length: int = 77, seed: int = 0,
                   vision_width: int = 128, layers: int = 2) -> CLIP:
    """A CLIP with 224 input, `patch_size` patches, 2-head vision and 1-head text towers."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 224, "patch_size": patch_size, "width": vision_width,
                    "layers": layers, "head_width": 64},
        text_cfg={"context_length": context_length, "vocab_size": 49408, "width": 64,
                  "heads": 1, "layers": layers},
        quick_gelu=True,
    )
    # Random init leaves the logit scale at log(1/0.07); keep it, the engine uses 50 anyway.
    return model.eval()


def save_plain(model: CLIP, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def save_farslip1(model: CLIP, path: Path) -> Path:
    """The release format: {'state_dict': {'module.'+name: fp16 tensor}}."""
    sd = {"module." + k: v.half() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1}, path)
    return path


def save_farslip2(model: CLIP, path: Path, keep: int = 20) -> Path:
    """LongCLIP text format: positional_embedding + positional_embedding_res.

    The effective embedding is pos[i] for i < keep and pos_res[i] otherwise;
    we split the model's own embedding so that folding gives it back exactly.
    """
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    pos = sd["positional_embedding"]
    base = torch.zeros_like(pos)
    res = torch.zeros_like(pos)
    base[:keep] = pos[:keep]
    res[keep:] = pos[keep:]
    sd["positional_embedding"] = base
    sd["positional_embedding_res"] = res
    sd = {"module." + k: v.half() for k, v in sd.items()}
    torch.save({"state_dict": sd}, path)
    return path


def save_safetensors(model: CLIP, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
