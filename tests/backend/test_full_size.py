"""Full-size FarSLIP shapes: a random ViT-B/16 with a 248-token LongCLIP text tower, saved as the release
does (fp16, `module.` prefix, split positional embedding), loads as the right architecture and computes the
same dense patch features and text embeddings as the model it was saved from."""

import open_clip
import torch
from tinymodels import save_farslip2

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.models import load_model
from backend.engine.text import encode_tokens


def test_farslip2_vit_b16_release_format_round_trip(tmp_path):
    cfg = open_clip.get_model_config("ViT-B-16")
    torch.manual_seed(0)
    original = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                    text_cfg=dict(cfg["text_cfg"], context_length=248), quick_gelu=True).eval()
    original = original.half().float()  # the release stores fp16
    path = save_farslip2(original, tmp_path / "FarSLIP2_ViT-B-16.pt")
    loaded = load_model(str(path))
    visual = loaded.model.visual
    assert loaded.context_length == 248
    assert visual.conv1.kernel_size == (16, 16) and visual.conv1.out_channels == 768
    assert len(visual.transformer.resblocks) == 12 and visual.transformer.resblocks[0].attn.num_heads == 12
    assert visual.proj.shape == (768, 512)

    pixels = normalize_pixels(torch.rand(1, 3, 224, 224) * 255)
    tokens = open_clip.get_tokenizer("ViT-B-16", context_length=248)(["a satellite image of a lake."])
    with torch.no_grad():
        expected = dense_patch_features(original.visual, pixels)
        got = dense_patch_features(visual, pixels)
        text_expected = original.encode_text(tokens)
        text_got = encode_tokens(loaded.model, loaded.tokenizer(["a satellite image of a lake."]))
    assert got.shape == (1, 14, 14, 512)
    assert (got - expected).abs().max() < 1e-4
    assert (text_got - text_expected).abs().max() < 1e-3
