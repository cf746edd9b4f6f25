"""The last-block attention variants compute y = out_proj(A @ v) from ln_1(x), with no residual and no MLP."""

import pytest
import torch
import torch.nn.functional as F
from tinymodels import make_tiny_clip

from backend.engine.dense import dense_patch_features, normalize_pixels


def plain_dense(visual, pixels, variant):
    """Written out per head, as in the SegEarth-OV / RS-OVSS description of section 3."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    h = block.ln_1(x)
    heads = block.attn.num_heads
    q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    outputs = []
    for head in range(heads):
        part = slice(head * q.shape[-1] // heads, (head + 1) * q.shape[-1] // heads)
        qh, kh, vh = q[..., part], k[..., part], v[..., part]
        scale = qh.shape[-1] ** -0.5
        sims = {name: torch.softmax(a @ b.transpose(1, 2) * scale, dim=-1)
                for name, (a, b) in {"qq": (qh, qh), "kk": (kh, kh), "vv": (vh, vh), "qk": (qh, kh)}.items()}
        weights = {"segearth": sims["qq"] + sims["kk"] + sims["vv"], "sclip": sims["qq"] + sims["kk"],
                   "clearclip": sims["qq"], "vanilla": sims["qk"],
                   "maskclip": torch.eye(qh.shape[1]).expand(qh.shape[0], -1, -1)}[variant]
        outputs.append(weights @ vh)
    y = block.attn.out_proj(torch.cat(outputs, dim=-1))
    y = visual.ln_post(y)[:, 1:] @ visual.proj
    grid = pixels.shape[-1] // visual.conv1.kernel_size[0]
    return F.normalize(y, dim=-1).reshape(pixels.shape[0], grid, grid, -1)


@pytest.mark.parametrize("variant", ["segearth", "sclip", "clearclip", "maskclip", "vanilla"])
def test_attention_variant_matches_its_definition(variant):
    visual = make_tiny_clip(16).visual
    pixels = normalize_pixels(torch.rand(2, 3, 224, 224) * 255)
    with torch.no_grad():
        got = dense_patch_features(visual, pixels, variant)
        expected = plain_dense(visual, pixels, variant)
    assert got.shape == (2, 14, 14, 64)
    assert (got - expected).abs().max() < 1e-5


def test_variants_differ_and_unknown_variant_is_refused():
    visual = make_tiny_clip(16).visual
    pixels = normalize_pixels(torch.rand(1, 3, 224, 224) * 255)
    with torch.no_grad():
        a = dense_patch_features(visual, pixels, "segearth")
        b = dense_patch_features(visual, pixels, "clearclip")
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown attention"):
        dense_patch_features(visual, pixels, "nope")
