"""The model the worker owns: loaded on first use, kept between jobs, swapped when a job asks for another."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from .cleanup import free_device_memory

log = logging.getLogger("farslip.jobs")


def _stat_identity(path: Path) -> tuple:
    """The path and weights.stat_identity of the file there (size, mtime, ctime, inode), None when it is gone."""
    from backend.engine.weights import stat_identity

    try:
        return (str(path), tuple(stat_identity(path.stat()).values()))
    except OSError:
        return (str(path), None)


def source_identity(model: str | None, weights: str | None) -> tuple:
    """What the files a model is read from are now (path and stat identity of each): a checkpoint
    copied over the one a job loaded, or a model folder trained again with overwrite, has another identity,
    so the next job loads it instead of reusing the model read before. Nothing is read or downloaded."""
    from backend.engine.models import locate_model
    from backend.engine.weights import find_local_weights

    try:
        kind, where, explicit = locate_model(model, weights)
    except Exception:  # the load itself raises the sentence
        return ()
    if kind == "finetuned":
        return tuple(_stat_identity(child) for child in sorted(Path(where).iterdir()) if child.is_file())
    if kind == "checkpoint":
        return _stat_identity(Path(where))
    local = Path(explicit).expanduser() if explicit else find_local_weights(where)
    return _stat_identity(local) if local is not None else ()


class ModelCache:
    """Holds one loaded model; loads on first use, keeps it, swaps when a job asks for another."""

    def __init__(self, device: str, features: Any = None):
        self.device = device
        self.features = features  # a FeatureCache shared by segment jobs (features are keyed by weights)
        self._key: tuple | None = None
        self._loaded: Any = None
        self._lock = threading.RLock()

    @property
    def loaded(self) -> Any:
        """The model held now (a LoadedModel), None before the first job or after unloading."""
        return self._loaded

    @property
    def loaded_name(self) -> str | None:
        loaded = self._loaded
        return getattr(loaded, "name", None) if loaded is not None else None

    def unload(self) -> None:
        with self._lock:
            if self._loaded is not None:
                log.info("unloading model %s", self.loaded_name)
                self._key, self._loaded = None, None
                free_device_memory()

    def get(self, model: str | None, weights: str | None, half: bool = False) -> Any:
        from backend.engine.models import load_model

        key = (model, weights, half, source_identity(model, weights))
        with self._lock:
            if self._key == key and self._loaded is not None:
                return self._loaded
            self.unload()
            self._loaded = load_model(model, weights=weights, device=self.device, half=half)
            self._key = key
            log.info("loaded model %s on %s", self.loaded_name, self.device)
            return self._loaded
