"""Fixtures for training tests: a tiny model on disk, a synthetic labelled GeoTIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tinymodels import make_tiny_clip, save_safetensors
from training_data import make_synthetic


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_safetensors(make_tiny_clip(), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))
