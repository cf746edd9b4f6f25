"""Fixtures for training tests: a synthetic labelled GeoTIFF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from training_data import make_synthetic


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))
