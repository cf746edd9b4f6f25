"""Processing algorithms that start the backend themselves: run as QGIS's Processing dialog runs them (a task
in QGIS's thread pool), cancelled or left behind by an unloaded plugin while the backend starts."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
from plugin_helpers import NAIP, REPO, start_algorithm, users_roads_geopackage, wait_until
from qgis.core import QgsApplication, QgsProject, QgsVectorLayer
from qgis.PyQt.QtCore import QThreadPool

BACKEND_COMMAND = os.environ.get("FARSLIP_TEST_BACKEND") or str(REPO / ".venv" / "bin" / "farslip")


def backend_processes(connection_file: str) -> list[int]:
    """Processes whose command line names this connection file (a backend started for it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if connection_file.encode() in cmdline.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.fixture
def idle_plugin(farslip, qgis_iface, qgis_processing, backend_home, tmp_path, monkeypatch):
    """The plugin loaded with no backend running yet (it starts one when an algorithm needs it)."""
    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "state"))  # no other test's backend is found
    from qgis_farslip.settings import PluginSettings

    PluginSettings(backend_command=BACKEND_COMMAND, auto_start=True, output_folder=str(tmp_path / "results")).save()
    plugin = farslip.classFactory(qgis_iface)
    plugin.initGui()
    plugin.manager.connection_file = str(tmp_path / "plugin-backend.json")
    yield plugin
    if plugin.manager is not None:
        plugin.unload()
    PluginSettings().save()


def test_an_algorithm_that_holds_the_only_pool_thread_still_gets_the_backend_started(idle_plugin, tiny_model,
                                                                                      tmp_path):
    """Two algorithms started together on a two-core machine held both threads of QGIS's pool while they waited
    for the backend; the look-up for it was queued behind them and never ran (130 s, then 'not ready')."""
    pool = QThreadPool.globalInstance()
    threads = pool.maxThreadCount()
    pool.setMaxThreadCount(1)
    try:
        run = start_algorithm({"INPUT": str(NAIP), "CLASSES": "water\nforest", "MODEL": str(tiny_model),
                               "REGION_CHECKS": False, "OUTPUT": str(tmp_path / "first.gpkg")})
        wait_until(lambda: run["done"], 170, "the algorithm to finish")
    finally:
        pool.setMaxThreadCount(threads)
    ok, results = run["done"][0]
    assert ok, run["feedback"].errors
    assert QgsVectorLayer(results["OUTPUT"], "first", "ogr").featureCount() > 0


def test_into_an_existing_geopackage_the_written_layer_is_what_loads(idle_plugin, tiny_model, tmp_path):
    """The backend adds its layer beside the file's others; QGIS loaded the file's first table (the user's roads)
    as 'Segmented polygons' and styled it by class."""
    target = tmp_path / "project.gpkg"
    users_roads_geopackage(str(target), "EPSG:4326", "LINESTRING(1 2, 3 4)")
    import processing

    before = set(QgsProject.instance().mapLayers())
    results = processing.runAndLoadResults("farslip:segment_by_class_names", {
        "INPUT": str(NAIP), "CLASSES": "water\nforest", "MODEL": str(tiny_model), "REGION_CHECKS": False,
        "OUTPUT": str(target)})
    assert results["OUTPUT"] == f"{target}|layername=project"
    loaded = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
    assert len(loaded) == 1 and loaded[0].source() == results["OUTPUT"]
    assert loaded[0].geometryType() == 2 and loaded[0].featureCount() > 0 and "class" in loaded[0].fields().names()
    QgsProject.instance().removeMapLayer(loaded[0].id())
    with sqlite3.connect(target) as db:
        tables = sorted(row[0] for row in db.execute("SELECT table_name FROM gpkg_contents"))
    assert tables == ["project", "roads"]


def test_cancel_while_the_backend_starts_says_cancelled(idle_plugin, tiny_model, tmp_path):
    """A cancel before the backend was ready said 'The FarSLIP backend is not ready.' (or an earlier failure)."""
    run = start_algorithm({"INPUT": str(NAIP), "CLASSES": "water\nforest", "MODEL": str(tiny_model),
                           "OUTPUT": str(tmp_path / "cancelled.gpkg")})
    wait_until(lambda: idle_plugin.manager.state == "starting", 30, "the backend to be looked for")
    run["feedback"].cancel()
    wait_until(lambda: run["done"], 60, "the algorithm to end")
    assert run["done"][0][0] is False
    assert run["feedback"].errors == ["Cancelled; nothing was written."]
    assert not (tmp_path / "cancelled.gpkg").exists()


def test_unloading_the_plugin_while_an_algorithm_waits_ends_it_and_starts_no_backend(idle_plugin, tiny_model,
                                                                                    tmp_path):
    """An unload during the look-up raised 'wrapped C/C++ object ... has been deleted', started a backend after
    the plugin was gone, and left the algorithm waiting 130 s."""
    connection_file = idle_plugin.manager.connection_file
    run = start_algorithm({"INPUT": str(NAIP), "CLASSES": "water\nforest", "MODEL": str(tiny_model),
                           "OUTPUT": str(tmp_path / "never.gpkg")})
    wait_until(lambda: idle_plugin.manager.state == "starting", 30, "the backend to be looked for")
    manager = idle_plugin.manager
    idle_plugin.unload()
    wait_until(lambda: run["done"], 30, "the waiting algorithm to end")
    assert run["done"][0][0] is False
    assert [e for e in run["feedback"].errors if "unloaded" in e], run["feedback"].errors
    deadline = time.monotonic() + 3  # a look-up answered after the unload must not start a backend
    while time.monotonic() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.05)
    assert manager.process is None
    assert backend_processes(connection_file) == []
