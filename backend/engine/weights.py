"""Weight files of registry models: found locally, in the Hugging Face cache, or downloaded; hashed.

Weights are found, in this order: an explicit ``--weights PATH``; the weights directory
(``$FARSLIP_WEIGHTS``, see :func:`backend.engine.paths.weights_dir`); the Hugging Face hub cache
(downloading into it when online). A missing file is one clear :class:`ModelError`; there is never
a silent fallback to other weights. A quick TCP probe makes the no-network case fail at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from backend.engine import paths
from backend.engine.atomic import write_text_atomically
from backend.engine.files import expand_user
from backend.engine.errors import ModelError
from backend.engine.registry import (
    ModelSpec,
)

HASH_CACHE_FILE = "weights_sha256.json"


_HASH_CHUNK = 1 << 20


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
        path = expand_user(weights, "weights", ModelError)
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


def stat_identity(st: os.stat_result) -> dict:
    """What tells one version of a file from another without reading it: size and mtime, which a copy
    (cp -p, rsync -a, tar) can set back, plus the inode and ctime, which nobody can: a file replaced in
    place or renamed over always gets a new ctime or inode (a chmod or touch too, which only costs a rehash)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (weights, rasters, labels), remembered by its stat identity in the cache directory."""
    return files_sha256([path])[0]


def files_sha256(files: list[str | os.PathLike]) -> list[str]:
    """sha256 of each file, remembered in the cache directory by (path, :func:`stat_identity`): a file
    whose size, mtime, ctime or inode changed is read again. One read and one write of the memo, however
    many files (the sources of a VRT mosaic)."""
    resolved = [Path(path).resolve() for path in files]
    stats = [path.stat() for path in resolved]
    cache_file = paths.cache_dir() / HASH_CACHE_FILE
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    shas: list[str] = []
    changed = False
    for path, st in zip(resolved, stats):
        identity = stat_identity(st)
        hit = cache.get(str(path))
        if isinstance(hit, dict) and isinstance(hit.get("sha256"), str) and all(
                hit.get(key) == value for key, value in identity.items()):
            shas.append(hit["sha256"])
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        shas.append(digest.hexdigest())
        if stat_identity(os.stat(path)) == identity:  # not remembered when the file changed while it was read
            cache[str(path)] = {**identity, "sha256": shas[-1]}
            changed = True
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(cache_file, json.dumps(cache, indent=1), durable=False)
        except OSError:
            pass  # a read-only cache only costs a rehash next time
    return shas
