"""Model registry, weight resolution and checkpoint loading.

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
Loading never unpickles code: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from backend.engine import paths
from backend.engine.errors import InputError, ModelError

DEFAULT_MODEL = "farslip2-vit-b-16"
REGISTRY_FILE = "models.json"
FINETUNED_FORMAT = "farslip-finetuned/1"
FINETUNED_WEIGHTS = "model.safetensors"
FINETUNED_META = "farslip_model.json"
# LongCLIP "knowledge-preserved stretching": positions below this come from
# `positional_embedding`, the others from `positional_embedding_res`.
LONGCLIP_KEEP = 20
HASH_CACHE_FILE = "weights_sha256.json"
_HASH_CHUNK = 1 << 20
# Keys some exporters (OpenAI's JIT state dict) carry that are not parameters.
_NON_PARAM_KEYS = {"input_resolution", "context_length", "vocab_size", "mask1", "mask2"}
ACTIVATIONS = ("quickgelu", "gelu")
DEFAULT_ACTIVATION = "quickgelu"  # OpenAI CLIP and everything fine-tuned from it, FarSLIP included


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    hf_repo: str
    hf_file: str
    context_length: int
    licence: str
    description: str
    # File name expected in the weights directory when the hub file's base name
    # is ambiguous (OpenAI CLIP B/16 and B/32 are both `open_clip_model.safetensors`).
    local_file: str | None = None
    # Hugging Face text tower (e.g. xlm-roberta-base) for models whose text side is not CLIP's own.
    text_tower: str | None = None
    # Languages the text tower was trained on (ISO 639-1); None means English only.
    languages: tuple[str, ...] | None = None
    # MLP activation the weights were trained with: "quickgelu" (OpenAI CLIP, FarSLIP) or "gelu".
    activation: str = DEFAULT_ACTIVATION

    @property
    def weights_filename(self) -> str:
        """The file name to put in the weights directory."""
        return self.local_file or PurePosixPath(self.hf_file).name

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file}"


@functools.lru_cache(maxsize=4)
def _load_registry(path: str) -> tuple[ModelSpec, ...]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = set(ModelSpec.__dataclass_fields__)
        specs = []
        for m in data["models"]:
            values = {k: v for k, v in m.items() if k in fields}
            if values.get("languages") is not None:
                values["languages"] = tuple(values["languages"])
            specs.append(ModelSpec(**values))
        bad = [s.name for s in specs if s.activation not in ACTIVATIONS]
        if bad:
            raise ValueError(f"activation of {', '.join(bad)} must be one of {', '.join(ACTIVATIONS)}")
        return tuple(specs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"The model registry {path} is unreadable ({exc}). Reinstall the project.") from exc


def known_models() -> dict[str, ModelSpec]:
    """The registry from resources/models.json, by name (default model first)."""
    specs = _load_registry(str(paths.resources_dir() / REGISTRY_FILE))
    return {s.name: s for s in specs}


# --------------------------------------------------------------------------- loaded model


@dataclass
class LoadedModel:
    model: Any  # open_clip.model.CLIP, eval mode, fp32, on `device`
    name: str
    tokenizer: Callable[[list[str]], torch.Tensor]
    context_length: int
    weights_id: str
    class_lines: list[str] | None = None
    metadata: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else must be usable here."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"Unknown device '{device}'. Use auto, cpu, cuda or mps.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("Device 'cuda' was requested but no CUDA GPU is usable here. Use --device cpu.")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError("Device 'mps' was requested but Apple MPS is not available. Use --device cpu.")
    return dev


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77):
    """open_clip's CLIP BPE tokenizer padding/truncating to `context_length` (77 or 248)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


# --------------------------------------------------------------------------- weight files


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """The hub's host name when a TCP connection to it fails quickly, else None.

    huggingface_hub retries a failed request for ~25 s; this probe makes the
    no-network case fail at once. Behind a proxy the probe is skipped.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError:
        return host


def _weights_dir_candidates(spec: ModelSpec) -> list[Path]:
    wdir = paths.weights_dir()
    cands = [wdir / spec.weights_filename]
    if spec.local_file is None and spec.hf_file != spec.weights_filename:
        cands.append(wdir / spec.hf_file)  # e.g. a copy of the repo layout: ckpt/RS5M_ViT-B-32.pt
    return cands


def _hub_cached(spec: ModelSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.hf_repo, spec.hf_file, cache_dir=str(hf_cache_dir()))
    except Exception:
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def find_local_weights(spec: ModelSpec) -> Path | None:
    """Weights already on this computer (weights directory, then hub cache); never downloads."""
    for cand in _weights_dir_candidates(spec):
        if cand.is_file():
            return cand
    return _hub_cached(spec)


def missing_weights_message(spec: ModelSpec, reason: str = "") -> str:
    wdir = paths.weights_dir()
    msg = (
        f"The weights of model '{spec.name}' are not on this computer: file '{spec.hf_file}' "
        f"from the Hugging Face hub repository '{spec.hf_repo}' ({spec.hub_url})."
    )
    if reason:
        msg += f" {reason}"
    msg += (
        f" Download it and put it in the weights directory {wdir} as '{spec.weights_filename}' "
        f"(or set FARSLIP_WEIGHTS to the folder holding it, or pass --weights PATH)."
        " No other weights were used instead."
    )
    return msg


def resolve_weights(spec: ModelSpec, weights: str | os.PathLike | None = None) -> Path:
    """The weight file of a registry model: --weights > weights dir > hub cache > hub download."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"Weights file {path} does not exist (given with --weights for '{spec.name}').")
        return path
    local = find_local_weights(spec)
    if local is not None:
        return local
    if _hf_offline():
        raise ModelError(missing_weights_message(spec, "The hub is offline (HF_HUB_OFFLINE=1)."))
    host = _hub_unreachable()
    if host:
        raise ModelError(missing_weights_message(
            spec, f"This computer cannot reach {host} (no network), so it could not be downloaded."))
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(spec.hf_repo, spec.hf_file, cache_dir=str(hf_cache_dir()),
                                    etag_timeout=10))
    except Exception as exc:  # network, auth, missing file: all mean "not available"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(missing_weights_message(
            spec, f"Downloading it failed ({type(exc).__name__}: {reason[:200]}).")) from exc


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (weights, rasters, labels), cached by (path, size, mtime) in the cache directory."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    cache_file = paths.cache_dir() / HASH_CACHE_FILE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return str(hit["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return sha


# --------------------------------------------------------------------------- state dicts


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file as an fp32 open_clip state dict (no pickled code ever runs).

    Accepts `.safetensors`, plain torch state dicts and training checkpoints
    (`state_dict` / `model` entry, `module.` prefixes, fp16), and folds
    FarSLIP2/LongCLIP split text positional embeddings.
    """
    return fold_longclip_positional(read_tensors(path))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as stored (fp32, prefixes stripped, LongCLIP embeddings not folded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"Checkpoint file {path} does not exist.")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc}).") from exc
    else:
        try:
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


# --------------------------------------------------------------------------- fine-tuned dirs


def is_finetuned_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / FINETUNED_WEIGHTS).is_file() and (p / FINETUNED_META).is_file()


def read_finetuned_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / FINETUNED_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_file} is unreadable ({exc}).") from exc
    fmt = str(meta.get("format", "")) if isinstance(meta, dict) else ""
    if not fmt.startswith("farslip-finetuned/"):
        raise ModelError(f"{meta_file} is not a FarSLIP fine-tuned model description "
                         f"(format '{fmt}', expected '{FINETUNED_FORMAT}').")
    lines = meta.get("class_lines")
    if lines is not None and not (isinstance(lines, list) and all(isinstance(s, str) for s in lines)):
        raise ModelError(f"{meta_file}: 'class_lines' must be a list of strings.")
    return meta


def _finetuned_dirs() -> list[Path]:
    root = paths.models_dir()
    try:
        return sorted(p for p in root.iterdir() if is_finetuned_dir(p))
    except OSError:
        return []


# --------------------------------------------------------------------------- loading


def _check_spec(spec: ModelSpec, cfg: dict, path: Path) -> None:
    m = re.search(r"-(\d+)$", spec.arch)
    patch = int(m.group(1)) if m else None
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
    from .languages import LANGUAGES

    folder = weights_path.parent
    config = hf_text.read_open_clip_config(folder)
    text_cfg = config["text_cfg"] if config else {}
    tower_name = (spec.text_tower if spec is not None else None) or str(text_cfg.get("hf_model_name") or "")
    tower_name = tower_name or str(metadata.get("finetuned", {}).get("text_tower") or "xlm-roberta-base")
    repos = [spec.hf_repo] if spec is not None else []
    found = hf_text.find_text_tower(tower_name, [folder], repos)
    tower = hf_text.tower_from_config(text_cfg, tower_name, found)
    vision_cfg = config["vision_cfg"] if config else infer_vision_cfg(sd)
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


def unknown_model_error(name: str) -> ModelError:
    """The error for a name that is neither a registry model, a path nor a fine-tuned model."""
    names = list(known_models()) + [p.name for p in _finetuned_dirs()]
    return ModelError(f"Unknown model '{name}'. Known models: {', '.join(names)}. "
                      "You can also give the path of a checkpoint file or of a fine-tuned model folder.")




def locate_model(model: str | None = None, weights: str | None = None) -> tuple[str, Any, str | None]:
    """Where `load_model` would take a model from, without reading any weights.

    Returns ("registry", spec, weights), ("finetuned", folder, None) or ("checkpoint", file, None);
    raises ModelError with the same sentences as `load_model`.
    """
    registry = known_models()
    if model is None and weights:
        model, weights = str(weights), None
    name = model or DEFAULT_MODEL
    spec = registry.get(name)
    if spec is not None:
        if weights and Path(weights).expanduser().is_dir():
            return "finetuned", Path(weights).expanduser(), None
        return "registry", spec, weights
    if weights:
        raise ModelError(f"--weights can only be combined with a registry model name, not with '{name}'.")
    path = Path(name).expanduser()
    if path.is_dir():
        if not is_finetuned_dir(path):
            raise ModelError(f"{path} is a folder but not a fine-tuned model: it needs "
                             f"{FINETUNED_WEIGHTS} and {FINETUNED_META}.")
        return "finetuned", path, None
    if path.is_file():
        return "checkpoint", path, None
    if "/" not in name and os.sep not in name:
        candidate = paths.models_dir() / name
        if is_finetuned_dir(candidate):
            return "finetuned", candidate, None
        raise unknown_model_error(name)
    raise ModelError(f"Model file or folder {path} does not exist.")


def check_model(model: str | None = None, weights: str | None = None) -> None:
    """Refuse what `load_model` would refuse for the model's name or files, without loading it.

    (Missing registry weights are left to `load_model`: finding them may mean a download.)
    """
    kind, where, explicit = locate_model(model, weights)
    if kind == "finetuned":
        read_finetuned_meta(where)
    elif kind == "registry" and explicit and not Path(explicit).expanduser().exists():
        raise ModelError(f"The weights file {explicit} does not exist.")


def load_model(model: str | None = None, weights: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load a registry model, a checkpoint file or a fine-tuned model directory.

    `weights` (``--weights``) overrides where a registry model's weights come
    from; with no `model` it names the checkpoint to load directly.
    """
    kind, where, explicit = locate_model(model, weights)
    if kind == "finetuned":
        return _load_finetuned(where, device)
    if kind == "checkpoint":
        return _finish(read_state_dict(where), name=where.stem, weights_path=where, device=device,
                       class_lines=None, activation=checkpoint_activation(where),
                       metadata={"kind": "checkpoint"})
    path = resolve_weights(where, explicit)
    return _finish(read_state_dict(path), name=where.name, weights_path=path, device=device,
                   class_lines=None, spec=where, activation=where.activation,
                   metadata={"kind": "registry", "spec": asdict(where)})


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


# --------------------------------------------------------------------------- listing


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
    for d in _finetuned_dirs():
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


def format_models_table(models: list[dict] | None = None) -> str:
    """Plain-text table for `farslip models`."""
    models = list_models() if models is None else models
    rows = [("name", "arch", "ctx", "present", "licence", "weights")]
    for m in models:
        name = m["name"] + (" *" if m["name"] == DEFAULT_MODEL else "") + (" (multilingual)" if m.get("multilingual")
                                                                           else "")
        if m["present"]:
            where = m["path"]
        else:
            where = f"missing: put {m['hf_repo']}/{m['hf_file']} at {m['expected_path']}"
        rows.append((name, m["arch"], str(m["context_length"]), "yes" if m["present"] else "no",
                     m["licence"], where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    lines.append("")
    lines.append(f"* default model. Weights directory: {paths.weights_dir()} (set FARSLIP_WEIGHTS to change); "
                 f"Hugging Face cache: {hf_cache_dir()}; fine-tuned models: {paths.models_dir()}.")
    return "\n".join(lines)
