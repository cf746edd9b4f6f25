"""Shared test setup: tests/ on sys.path (tinymodels), paths to the sample data."""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the sample data folder {SHARED_DATA} is missing (../shared/data)"
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Keep caches, weights and job history of tests out of the user's home."""
    root = tmp_path_factory.getbasetemp() / "farslip-home"
    monkeypatch.setenv("FARSLIP_HOME", str(root / "state"))
    monkeypatch.setenv("FARSLIP_CACHE", str(root / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
