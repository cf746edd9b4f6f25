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
                   vision_width: int = 128, layers: int = 2, quick_gelu: bool = True) -> CLIP:
    """A CLIP with 224 input, `patch_size` patches, 2-head vision and 1-head text towers
    (QuickGELU like OpenAI CLIP and FarSLIP, or plain GELU like GeoRSCLIP and RemoteCLIP)."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=64,
        vision_cfg={"image_size": 224, "patch_size": patch_size, "width": vision_width,
                    "layers": layers, "head_width": 64},
        text_cfg={"context_length": context_length, "vocab_size": 49408, "width": 64,
                  "heads": 1, "layers": layers},
        quick_gelu=quick_gelu,
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


# --------------------------------------------------------------------------- multilingual (RS-M-CLIP-like)

# A few remote-sensing sentences in the ten languages RS-M-CLIP was trained on, to train a tiny tokenizer.
TEN_LANGUAGE_SENTENCES = (
    "a satellite photo of buildings and a road next to a river",
    "uma fotografia aérea de edifícios e uma estrada junto a um rio",
    "una fotografía aérea de edificios y una carretera junto a un río",
    "une photographie aérienne de bâtiments et d'une route près d'une rivière",
    "ein Luftbild von Gebäuden und einer Straße an einem Fluss",
    "een luchtfoto van gebouwen en een weg naast een rivier",
    "una fotografia aerea di edifici e una strada vicino a un fiume",
    "河流旁边的建筑物和道路的卫星照片",
    "강 옆의 건물과 도로를 찍은 위성 사진",
    "аэрофотоснимок зданий и дороги рядом с рекой",
)


def make_tiny_text_tower(folder: Path, max_positions: int = 80) -> Path:
    """An XLM-RoBERTa-style text tower in the Hugging Face folder layout: a config for a 2-layer,
    32-wide encoder and a unigram tokenizer trained here on the ten-language sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(list(TEN_LANGUAGE_SENTENCES) * 4,
                                  trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", mask_token="<mask>", cls_token="<s>",
                            sep_token="</s>").save_pretrained(str(folder))
    XLMRobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2).save_pretrained(str(folder))
    return folder


def make_tiny_multilingual_clip(tower: Path, seed: int = 0, patch_size: int = 16):
    """An open_clip CustomTextCLIP: the tiny ViT image tower of `make_tiny_clip` and the tower above."""
    from open_clip.model import CustomTextCLIP

    torch.manual_seed(seed)
    model = CustomTextCLIP(
        64, {"image_size": 224, "patch_size": patch_size, "width": 128, "layers": 2, "head_width": 64},
        {"hf_model_name": str(tower), "hf_tokenizer_name": str(tower), "hf_pooler_type": "mean_pooler",
         "hf_proj_type": "mlp", "hf_model_pretrained": False},
        quick_gelu=False)  # open_clip's xlm-roberta-*-ViT-* models (and RS-M-CLIP) use plain GELU
    return model.eval()


def make_tiny_sam(image_size: int = 256, seed: int = 0):
    """A randomly initialised transformers SamModel of width 32 whose windows are `image_size` px."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(seed)
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=16, window_size=4, global_attn_indexes=[1],
                             num_pos_feats=16, mlp_dim=64)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    return SamModel(config).eval()


def save_tiny_sam(folder: Path, image_size: int = 256) -> Path:
    """A SAM model folder (config.json + model.safetensors), as `--sam-model` takes it."""
    make_tiny_sam(image_size).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    # `python tests/tinymodels.py PATH`: the tiny model of tests/conftest.py, for a Python without torch.
    import sys

    save_safetensors(make_tiny_clip(), Path(sys.argv[1]))
