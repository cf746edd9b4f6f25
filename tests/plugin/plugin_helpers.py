"""Helpers of the plugin tests (importable from the test modules, unlike conftest)."""

from __future__ import annotations

import time
from pathlib import Path

from qgis.core import QgsApplication

REPO = Path(__file__).resolve().parents[2]
NAIP = (REPO / ".." / "shared" / "data" / "naip_2020_5m.tif").resolve()
BACKEND_PYTHON = REPO / ".venv" / "bin" / "python"  # the backend's Python (QGIS's has no torch)


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    """Spin the Qt event loop until predicate() is true (tasks and QProcess need it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        QgsApplication.processEvents()
        time.sleep(0.02)


def run_dock_job(dock, timeout: float = 180.0) -> str:
    states = []
    dock.jobFinished.connect(states.append)
    try:
        dock.run()
        wait_until(lambda: states, timeout, "the job to finish")
    finally:
        dock.jobFinished.disconnect(states.append)
    return states[0]


def empty_dir(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def save_as_geopackage(layer, path: str) -> None:
    """Write a layer (a test's memory layer) to a GeoPackage file."""
    from qgis.core import QgsProject, QgsVectorFileWriter

    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message
