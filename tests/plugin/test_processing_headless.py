"""The Processing algorithms without QGIS's window: qgis_process (and QGIS Server, scripts) load a plugin that
says hasProcessingProvider=yes with its initProcessing() alone; the desktop calls initGui() (and newer QGIS
initProcessing() before it). The provider is registered once either way and removed on unload."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from qgis.core import QgsApplication

ALGORITHMS = ("farslip:segment_by_class_names", "farslip:train_on_labelled_polygons",
              "farslip:evaluate_on_labelled_polygons", "farslip:search_by_sentences")


def farslip_providers() -> list:
    return [provider for provider in QgsApplication.processingRegistry().providers() if provider.id() == "farslip"]


def test_init_processing_alone_makes_the_algorithms_available_and_unload_removes_them(farslip, qgis_iface):
    registry = QgsApplication.processingRegistry()
    plugin = farslip.classFactory(None)  # qgis_process has no iface
    plugin.initProcessing()
    try:
        for algorithm in ALGORITHMS:
            assert registry.algorithmById(algorithm) is not None, algorithm
        assert plugin.manager is not None  # what the algorithms start or find the backend with
    finally:
        plugin.unload()
    assert registry.providerById("farslip") is None and plugin.manager is None


@pytest.mark.parametrize("calls", [("initProcessing", "initGui"), ("initGui",)])
def test_the_desktop_registers_the_provider_once(farslip, qgis_iface, calls):
    plugin = farslip.classFactory(qgis_iface)
    for call in calls:
        getattr(plugin, call)()
    try:
        assert len(farslip_providers()) == 1
        assert plugin.provider is farslip_providers()[0]  # the plugin's own: unload removes it
        assert QgsApplication.processingRegistry().algorithmById(ALGORITHMS[0]) is not None
    finally:
        plugin.unload()
    assert farslip_providers() == []


QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")


@pytest.mark.skipif(QGIS_PROCESS is None, reason="no qgis_process on this computer")
def test_qgis_process_knows_the_algorithms(plugins_dir, tmp_path):
    """`qgis_process help farslip:segment_by_class_names` said "error starting plugin: qgis_farslip" and
    "Algorithm ... not found!"."""
    config = tmp_path / "qgis-config"  # a QGIS profile of its own, with the plugin enabled
    profile = config / "profiles" / "default" / "QGIS"
    profile.mkdir(parents=True)
    (profile / "QGIS3.ini").write_text("[PythonPlugins]\nqgis_farslip=true\n", encoding="utf-8")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    environment = dict(os.environ, HOME=str(tmp_path), XDG_RUNTIME_DIR=str(runtime), QT_QPA_PLATFORM="offscreen",
                       QGIS_PLUGINPATH=str(plugins_dir), QGIS_CUSTOM_CONFIG_PATH=str(config),
                       QGIS_OPTIONS_PATH=str(config))
    environment.pop("PYTHONPATH", None)
    run = subprocess.run([QGIS_PROCESS, "help", ALGORITHMS[0]], env=environment, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "error starting plugin" not in run.stdout + run.stderr
    assert "Segment raster by class names" in run.stdout
