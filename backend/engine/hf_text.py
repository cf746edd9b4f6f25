"""CLIP models whose text tower is a Hugging Face encoder (RS-M-CLIP's XLM-RoBERTa, open_clip's
`xlm-roberta-*-ViT-*` and `roberta-*` models).

open_clip builds such a tower from the Hugging Face model folder (its `config.json`) and tokenises
with that folder's tokenizer files, so both must be on this computer; they are looked for where
weights are: an explicit folder, beside the checkpoint, the weights directory, the hub cache.

Text encoding runs only up to the longest real sequence of a batch, as for CLIP's causal tower.
For these bidirectional encoders that is exact for a different reason: padding is masked out of
attention and out of the mean pooling, and RoBERTa-style position ids of real tokens do not depend
on how many pad tokens follow (tests/backend/test_multilingual.py measures it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import paths
from .errors import ModelError

# What a text tower needs: the encoder's configuration and a fast tokenizer. They may lie in different
# folders: RS-M-CLIP's hub repository has the tokenizer but not xlm-roberta-base's config.json.
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOWER_FILES = (CONFIG_FILE, TOKENIZER_FILE)
TOWER_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's defaults for towers whose checkpoint does not say (its xlm-roberta model configs).
DEFAULT_POOLER = "mean_pooler"
DEFAULT_CONTEXT = 77


def is_hf_text_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("text.transformer.") for key in sd)


def is_hf_text_model(model: Any) -> bool:
    text = getattr(model, "text", None)
    return text is not None and hasattr(text, "transformer") and hasattr(text, "pooler")


@dataclass(frozen=True)
class TextTower:
    """Where a Hugging Face text tower's files are, and how open_clip wraps it."""

    config_folder: Path  # holds config.json
    tokenizer_folder: Path  # holds tokenizer.json (+ tokenizer_config.json ...)
    name: str  # the Hugging Face model id it stands for, e.g. xlm-roberta-base
    pooler: str = DEFAULT_POOLER
    context_length: int = DEFAULT_CONTEXT

    def as_text_cfg(self, proj_type: str | None) -> dict:
        return {"hf_model_name": str(self.config_folder), "hf_tokenizer_name": str(self.tokenizer_folder),
                "hf_pooler_type": self.pooler, "hf_proj_type": proj_type, "hf_model_pretrained": False,
                "context_length": self.context_length}


def _hub_repos(name: str, extra: list[str]) -> list[str]:
    base = name.rstrip("/").split("/")[-1]
    return list(dict.fromkeys([*extra, name, f"FacebookAI/{base}"]))


def _hub_cached_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        from .weights import hf_cache_dir

        found = try_to_load_from_cache(repo, filename, cache_dir=str(hf_cache_dir()))
    except Exception:
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def tower_candidates(name: str, near: list[Path]) -> list[Path]:
    """Folders that may hold tower `name`'s files, in the order they are tried."""
    base = name.rstrip("/").split("/")[-1]
    cands: list[Path] = []
    for folder in near:
        cands += [folder / "text_tower", folder, folder / base]
    cands.append(paths.weights_dir() / base)
    return cands


def _find_file(filename: str, name: str, near: list[Path], repos: list[str]) -> Path | None:
    for folder in tower_candidates(name, near):
        if (folder / filename).is_file():
            return folder
    for repo in _hub_repos(name, repos):
        cached = _hub_cached_file(repo, filename)
        if cached is not None:
            return cached.parent
    return None


def find_text_tower(name: str, near: list[Path], hub_repos: list[str] | None = None,
                    explicit: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The folders holding tower `name`'s config.json and tokenizer.json; never downloads.

    `explicit` (a folder the user named) wins; then, for each file: folders `near` the weights (their
    `text_tower/` sub-folder, the folder itself, a `<name>/` sub-folder), the weights directory's
    `<name>/`, then the hub cache (`hub_repos`, repo `name`, and `FacebookAI/<name>`).
    """
    repos = list(hub_repos or [])
    if explicit:
        folder = Path(explicit).expanduser()
        missing = [f for f in TOWER_FILES if not (folder / f).is_file()]
        if missing:
            raise ModelError(f"The text tower folder {folder} lacks {', '.join(missing)}: it needs the Hugging "
                             f"Face files {', '.join(TOWER_FILES)} of '{name}'.")
        return folder, folder
    config = _find_file(CONFIG_FILE, name, near, repos)
    tokenizer = _find_file(TOKENIZER_FILE, name, near, repos)
    if config is None or tokenizer is None:
        raise ModelError(missing_tower_message(name, [f for f, d in ((CONFIG_FILE, config),
                                                                      (TOKENIZER_FILE, tokenizer)) if d is None]))
    return config, tokenizer


def missing_tower_message(name: str, missing: list[str]) -> str:
    target = paths.weights_dir() / name.rstrip("/").split("/")[-1]
    return (f"The text tower '{name}' of this model is not complete on this computer: "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (Hugging Face hub "
            f"repository '{name}'). Download {'it' if len(missing) == 1 else 'them'} and put "
            f"{'it' if len(missing) == 1 else 'them'} in {target} (or beside the checkpoint, or in the Hugging "
            "Face cache). No other text tower was used.")


def read_open_clip_config(folder: Path) -> dict | None:
    """The `model_cfg` of an open_clip hub folder's open_clip_config.json, when there is one."""
    path = folder / OPEN_CLIP_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}).") from exc
    cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ModelError(f"{path} is not an open_clip model configuration (no vision_cfg/text_cfg).")
    return cfg


def _proj_type(sd: dict[str, torch.Tensor]) -> str | None:
    if "text.proj.0.weight" in sd:
        return "mlp"
    if "text.proj.weight" in sd:
        return "linear"
    return None


def tower_from_config(text_cfg: dict, name: str, folders: tuple[Path, Path]) -> TextTower:
    return TextTower(config_folder=folders[0], tokenizer_folder=folders[1], name=name,
                     pooler=str(text_cfg.get("hf_pooler_type") or DEFAULT_POOLER),
                     context_length=int(text_cfg.get("context_length") or DEFAULT_CONTEXT))


def build_hf_clip(sd: dict[str, torch.Tensor], vision_cfg: dict, tower: TextTower, quick_gelu: bool = True):
    """An open_clip CustomTextCLIP with `sd` loaded (eval, fp32, CPU); the tower is built offline."""
    from open_clip.model import CustomTextCLIP

    embed_dim = int(sd["visual.proj"].shape[1])
    proj_type = _proj_type(sd)
    try:
        model = CustomTextCLIP(embed_dim, vision_cfg, tower.as_text_cfg(proj_type), quick_gelu=quick_gelu)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"The text tower in {tower.config_folder} could not be built ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}).") from exc
    result = model.load_state_dict(sd, strict=False)
    # position_ids is a buffer some transformers versions keep in the state dict and others not.
    missing = [k for k in result.missing_keys if k not in ("logit_bias",) and not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ModelError(f"The checkpoint does not match its text tower ({tower.name} in {tower.config_folder}): "
                         + "; ".join(parts) + ".")
    return model.float().eval()


def hf_tokenizer(tower: TextTower):
    """open_clip's Hugging Face tokenizer wrapper, padding/truncating to the tower's context."""
    from open_clip.tokenizer import HFTokenizer

    try:
        return HFTokenizer(str(tower.tokenizer_folder), context_length=tower.context_length)
    except (OSError, ValueError) as exc:
        raise ModelError(f"The tokenizer in {tower.tokenizer_folder} is unreadable ({type(exc).__name__}).") from exc


def encode_hf_tokens(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text for a Hugging Face tower, run only up to the longest real sequence."""
    pad = model.text.config.pad_token_id
    real = (tokens != pad).sum(dim=1)
    length = max(int(real.max().item()), 1)
    return model.text(tokens[:, :length])


def copy_tower(config_folder: Path, tokenizer_folder: Path, target: Path) -> None:
    """Copy a tower's config and tokenizer files into `target` (a fine-tuned model's text_tower/)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(config_folder / CONFIG_FILE, target / CONFIG_FILE)
    for name in (TOKENIZER_FILE, *TOWER_OPTIONAL):
        if (tokenizer_folder / name).is_file():
            shutil.copy2(tokenizer_folder / name, target / name)
