"""Download jobs: fetch a registry or SAM model's weights from the Hugging Face hub into the hub cache.

The plugin's "Download" action submits one (POST /v1/models/download) so that a
first-time user never has to find a checkpoint by hand. The download itself is
the engine's (cache, offline and no-network checks, the same sentences as the
CLI); this module only runs it beside the job's progress and cancel flag.
"""

from __future__ import annotations

import threading
from pathlib import Path

from backend.engine.errors import CancelledError, ModelError

POLL_S = 0.5
MB = 1024 * 1024


def downloadable(name: object):
    """The registry or SAM model (ModelSpec) named `name`, both as GET /v1/models lists them; else ModelError."""
    from backend.engine.registry import known_models
    from backend.engine.sam_models import known_sam_models

    specs = {**known_models(), **known_sam_models()}
    spec = specs.get(str(name))
    if spec is None:  # not the engine's sentence: a checkpoint path or a fine-tuned folder is not downloaded
        raise ModelError(f"Unknown model '{str(name)[:200]}': the models that can be downloaded are "
                         f"{', '.join(specs)}.")
    return spec


def check_download_request(request: dict) -> None:
    """Refuse a name that is not a registry or SAM model before the job is queued (HTTP 4xx)."""
    downloadable(request.get("model"))


def _bytes_on_disk(cache: Path, repo: str) -> int:
    """What the hub client has written so far for `repo` (finished blobs and *.incomplete parts)."""
    folder = cache / ("models--" + repo.replace("/", "--")) / "blobs"
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def _remote_size(spec) -> int:
    """The file's size from the hub's metadata (0 when the hub does not say)."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        return int(get_hf_file_metadata(hf_hub_url(spec.hf_repo, spec.hf_file), timeout=10).size or 0)
    except Exception:
        return 0


def run_download(request: dict, control, models) -> dict:
    """Worker side of a download job; reports megabytes as progress and stops waiting on cancel."""
    from backend.engine.sam_models import known_sam_models, resolve_sam_weights
    from backend.engine.weights import find_local_weights, hf_cache_dir, resolve_weights

    spec = downloadable(request.get("model"))
    local = find_local_weights(spec)
    if local is not None:
        return {"outputs": {"weights": str(local)}, "classes": []}
    control.message(f"Downloading {spec.name} from {spec.hub_url}.")
    outcome: dict = {}

    def fetch() -> None:
        try:
            outcome["path"] = resolve_sam_weights(spec) if spec.name in known_sam_models() else resolve_weights(spec)
        except ModelError as error:
            outcome["error"] = error
        except Exception as error:  # reported as the job's error, never lost with the thread
            outcome["error"] = ModelError(f"Downloading {spec.name} failed ({type(error).__name__}: {error}).")

    # The hub client has no cancel hook: the download runs in its own thread and a cancelled job stops
    # waiting for it (a partial file stays in the hub cache as *.incomplete and is resumed next time).
    thread = threading.Thread(target=fetch, name=f"download-{spec.name}", daemon=True)
    thread.start()
    total = 0
    cache = hf_cache_dir()
    while thread.is_alive():
        thread.join(POLL_S)
        if control.should_cancel():
            raise CancelledError(f"The download of {spec.name} was cancelled; run it again to resume.")
        total = total or _remote_size(spec)
        if total:
            done_mb, total_mb = min(_bytes_on_disk(cache, spec.hf_repo), total) // MB, max(1, total // MB)
            control.progress(done_mb, total_mb)
            control.message(f"Downloading {spec.name}: {done_mb} of {total_mb} MB.")
    if "error" in outcome:
        raise outcome["error"]
    return {"outputs": {"weights": str(outcome["path"])}, "classes": []}
