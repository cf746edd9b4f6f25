"""Shared test setup: tests/ on sys.path (tinymodels), paths to the sample data, the tiny model."""

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = REPO.parent / "shared" / "data"
BACKEND_PYTHON = REPO / ".venv" / "bin" / "python"
sys.path.insert(0, str(TESTS))

from isolated import isolated_environment  # noqa: E402 (tests/ on sys.path first)

# A suite started in the background of a shell (`make -j` runs the suites side by side, `cmd &`) may begin with
# SIGINT ignored. The Ctrl+C tests need Python's own handler, as a terminal gives it, in this process and in the
# programs it starts (an ignored signal stays ignored across exec; a handled one is the default there).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"the sample data folder {SHARED_DATA} is missing (../shared/data)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random open_clip model (16-pixel patches, seed 0) as safetensors, written once per session.

    QGIS's Python has no torch, so there the backend's Python (.venv) writes it.
    """
    path = tmp_path_factory.mktemp("models") / "tiny-clip.safetensors"
    if importlib.util.find_spec("torch") is not None:
        from tinymodels import make_tiny_clip, save_safetensors

        return save_safetensors(make_tiny_clip(), path)
    assert BACKEND_PYTHON.exists(), f"the backend venv {BACKEND_PYTHON.parent.parent} is missing (run `make setup`)"
    subprocess.run([str(BACKEND_PYTHON), str(TESTS / "tinymodels.py"), str(path)], cwd=REPO, check=True,
                   timeout=120)
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory):
    """The same folders for fixtures wider than a test (a module's runs), which are made before a test's own
    setup: they wrote into the user's cache, while the Ray workers they start used the tests' one."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in isolated_environment(tmp_path_factory).items():
            patch.setenv(name, value)
        yield


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Keep caches, weights and job history of tests out of the user's home."""
    for name, value in isolated_environment(tmp_path_factory).items():
        monkeypatch.setenv(name, value)


SYSTEM_PYTHON = Path("/usr/bin/python3")  # QGIS's Python, with the system's GDAL bindings (make setup installs them)


@pytest.fixture(scope="session")
def gdal_category_names():
    """Band 1's category names as the system's GDAL (the one QGIS uses) reads them: an independent reader of
    what the backend's rasterio cannot show."""
    import json

    def read(path: Path) -> list[str]:
        # gdal.Info, as gdalinfo -json: Debian's Band.GetCategoryNames() answers None even for names GDAL wrote.
        done = subprocess.run([str(SYSTEM_PYTHON), "-c", "import json, sys; from osgeo import gdal; print(json.dumps("
                               "gdal.Info(sys.argv[1], format='json')['bands'][0].get('categories')))", str(path)],
                              capture_output=True, text=True, timeout=60, check=True)
        return json.loads(done.stdout)

    return read
