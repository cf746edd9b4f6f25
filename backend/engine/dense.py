"""Dense patch features from a CLIP vision tower (FARSLIP_METHOD.md section 3).

The last transformer block is replaced by a training-free attention variant
(SegEarth-OV's q-q + k-k + v-v by default), without residual and MLP, so
that every patch token carries its own, spatially faithful embedding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .options import ATTENTION_VARIANTS  # declared with the --attention option (its choices)

if TYPE_CHECKING:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

# CLIP's normalisation in 0-255 units.
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..255 -> CLIP-normalised input."""
    mean = torch.tensor(CLIP_MEAN_255, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD_255, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def normalized_image(rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """RGB 0..255 (3, h, w) -> a CLIP-normalised float32 array (new, or `out`): the same float32 subtract
    and divide as `normalize_pixels`, so the same values.

    The engine normalises each strip of crop rows it reads once, in its read-ahead thread; crops are
    views of it. Normalising each crop instead did the work four times over (crops overlap by half
    each way), on the main thread.
    """
    mean = np.asarray(CLIP_MEAN_255, np.float32).reshape(3, 1, 1)
    std = np.asarray(CLIP_STD_255, np.float32).reshape(3, 1, 1)
    out = np.subtract(rgb, mean, out=out, dtype=np.float32)
    return np.divide(out, std, out=out)


def _positional_embedding(visual: VisionTransformer, grid_h: int, grid_w: int) -> torch.Tensor:
    """The tower's positional embedding, patch part bicubically resized to grid_h x grid_w."""
    pos = visual.positional_embedding
    cls_pos, patch_pos = pos[:1], pos[1:]
    side = math.isqrt(patch_pos.shape[0])
    if (side, side) == (grid_h, grid_w):
        return pos
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _self_similarity(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((x @ x.transpose(-2, -1)) * scale, dim=-1)


def _last_block(block: ResidualAttentionBlock, x: torch.Tensor, attention: str) -> torch.Tensor:
    """Replacement for the final block: y = Attn'(ln_1(x)), no residual, no MLP."""
    attn = block.attn
    heads = attn.num_heads
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    if attention == "maskclip":
        out = v
    elif attention == "vanilla":
        out = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
    else:
        weights = _self_similarity(q, scale)
        if attention in ("sclip", "segearth"):
            weights = weights + _self_similarity(k, scale)
        if attention == "segearth":
            weights = weights + _self_similarity(v, scale)
        out = weights @ v
    batch, _, tokens, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return attn.out_proj(out)


def _trunk(visual: VisionTransformer, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Tokens after blocks 1..L-1 (the part the CLS path and the dense path share), and the patch grid."""
    patch = visual.conv1.kernel_size[0]
    grid_h, grid_w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    assert grid_h * patch == pixels.shape[-2] and grid_w * patch == pixels.shape[-1]

    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + _positional_embedding(visual, grid_h, grid_w).to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, grid_h, grid_w


def _dense_head(visual: VisionTransformer, x: torch.Tensor, grid_h: int, grid_w: int,
                attention: str, normalize: bool = True) -> torch.Tensor:
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {attention!r}; choose one of {ATTENTION_VARIANTS}")
    x = _last_block(visual.transformer.resblocks[-1], x, attention)
    x = visual.ln_post(x)[:, 1:] @ visual.proj
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.reshape(x.shape[0], grid_h, grid_w, -1)


def dense_patch_features(visual: VisionTransformer, pixels: torch.Tensor,
                         attention: str = "segearth", normalize: bool = True) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, H/p, W/p, D) L2-normalised patch embeddings.

    H and W must be multiples of the patch size. `normalize=False` keeps the projected tokens
    unnormalised (what FarSLIP's distillation pools).
    """
    if attention not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {attention!r}; choose one of {ATTENTION_VARIANTS}")
    x, grid_h, grid_w = _trunk(visual, pixels)
    return _dense_head(visual, x, grid_h, grid_w, attention, normalize)


def image_and_patch_features(visual: VisionTransformer, pixels: torch.Tensor,
                             attention: str = "segearth") -> tuple[torch.Tensor, torch.Tensor]:
    """The image embedding (as CLIP's encode_image, L2-normalised, (B, D)) and the dense patch
    embeddings ((B, H/p, W/p, D)) of the same crops, sharing blocks 1..L-1: one extra block, not a
    second pass."""
    x, grid_h, grid_w = _trunk(visual, pixels)
    image = visual.transformer.resblocks[-1](x)
    image = F.normalize(visual.ln_post(image)[:, 0] @ visual.proj, dim=-1)
    return image, _dense_head(visual, x, grid_h, grid_w, attention)
