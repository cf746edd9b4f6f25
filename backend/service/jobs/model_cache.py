"""The model the worker owns: loaded on first use, kept between jobs, swapped when a job asks for another."""

from __future__ import annotations

import logging
import threading
from typing import Any

from .cleanup import free_device_memory

log = logging.getLogger("farslip.jobs")


class ModelCache:
    """Holds one loaded model; loads on first use, keeps it, swaps when a job asks for another."""

    def __init__(self, device: str, features: Any = None):
        self.device = device
        self.features = features  # a FeatureCache shared by segment jobs (features are keyed by weights)
        self._key: tuple | None = None
        self._loaded: Any = None
        self._lock = threading.RLock()

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

        key = (model, weights, half)
        with self._lock:
            if self._key == key and self._loaded is not None:
                return self._loaded
            self.unload()
            self._loaded = load_model(model, weights=weights, device=self.device, half=half)
            self._key = key
            log.info("loaded model %s on %s", self.loaded_name, self.device)
            return self._loaded
