"""Plugin tests in a real QGIS (Debian's 3.22, offscreen, pytest-qgis).

The plugin under test is the one inside the built zip, unpacked into a plugin
folder, exactly as "Install from ZIP" would install it. The end-to-end tests
start the real backend (`.venv/bin/farslip serve`) with the tiny random model
of tests/conftest.py (which the backend's own Python writes: QGIS's Python has no torch).
"""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
from osgeo import gdal
from plugin_helpers import NAIP, REPO, wait_until
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer

# QGIS keeps the statistics it computes for a layer's style in NAME.aux.xml beside the raster (GDAL's PAM):
# in a test run, beside ../shared/data and the repo's own sample. This process only (QGIS's GDAL); the backend
# the tests start reads PAM files as a user's would.
gdal.SetConfigOption("GDAL_PAM_ENABLED", "NO")

BACKEND_FARSLIP = REPO / ".venv" / "bin" / "farslip"
# Another backend command line to test against (an installed backend, a wrapper), as the settings take it.
BACKEND_COMMAND = os.environ.get("FARSLIP_TEST_BACKEND") or str(BACKEND_FARSLIP)
sys.path.insert(0, str(REPO / "scripts"))


@pytest.fixture(scope="session")
def plugin_zip(tmp_path_factory) -> Path:
    import build_plugin

    return build_plugin.build(tmp_path_factory.mktemp("dist") / "qgis_farslip.zip")


@pytest.fixture(scope="session")
def plugins_dir(plugin_zip, tmp_path_factory) -> Path:
    """A QGIS plugin folder with the zip unpacked in it, first on sys.path."""
    folder = tmp_path_factory.mktemp("python-plugins")
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(folder)
    sys.path.insert(0, str(folder))
    for name in [name for name in sys.modules if name == "qgis_farslip" or name.startswith("qgis_farslip.")]:
        del sys.modules[name]
    return folder


@pytest.fixture(scope="session")
def farslip(plugins_dir):
    """The plugin package, imported from the unpacked zip."""
    module = importlib.import_module("qgis_farslip")
    assert Path(module.__file__).resolve().parent == (plugins_dir / "qgis_farslip").resolve()
    return module


@pytest.fixture(scope="session")
def backend_home(tmp_path_factory) -> Path:
    """Backend state outside the user's home, for the backend the plugin starts."""
    home = tmp_path_factory.getbasetemp() / "farslip-home"
    os.environ["FARSLIP_HOME"] = str(home / "state")
    os.environ["FARSLIP_CACHE"] = str(home / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FARSLIP_DEVICE"] = "cpu"
    return home


def save_settings(farslip, **values):
    from qgis_farslip.settings import PluginSettings

    settings = PluginSettings(**values)
    settings.save()
    return settings


@pytest.fixture
def plugin_settings(farslip, tmp_path):
    """Settings for one test: output into tmp_path, no remembered dock choices; defaults afterwards."""
    from qgis_farslip.remembered import LastChoices
    from qgis_farslip.settings import PluginSettings

    LastChoices().save()

    def configure(**values):
        values.setdefault("output_folder", str(tmp_path / "results"))
        values.setdefault("backend_command", BACKEND_COMMAND)
        return save_settings(farslip, **values)

    yield configure
    PluginSettings().save()
    LastChoices().save()


@pytest.fixture
def bare_dock(farslip, qgis_iface, plugin_settings, qgis_new_project):
    """A dock with a backend manager that has not connected (for the inputs and the widgets). The VRTs it keeps
    of layers go to the test session's cache folder (tests/conftest.py's _isolated_state), never the user's."""
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.dock import FarslipDock

    plugin_settings()
    widget = FarslipDock(qgis_iface, BackendManager())
    yield widget
    widget.close_down()
    widget.manager.stop()  # a backend a test's Run or Train started must not hold the state folder
    widget.deleteLater()


@pytest.fixture(scope="module")
def running_plugin(farslip, qgis_iface, backend_home, tiny_model):
    """The plugin, loaded once per module, with the backend it started (shared by the end-to-end tests)."""
    assert BACKEND_FARSLIP.exists() or "FARSLIP_TEST_BACKEND" in os.environ, \
        "the backend venv .venv is missing (run `make setup`)"
    save_settings(farslip, backend_command=BACKEND_COMMAND, auto_start=True)
    log = []
    QgsApplication.messageLog().messageReceived.connect(
        lambda message, tag, level: log.append(message) if tag == "FarSLIP" else None)
    plugin = farslip.classFactory(qgis_iface)
    plugin.test_log = log
    plugin.initGui()
    plugin.manager.connection_file = str(backend_home / "plugin-backend.json")
    plugin.show_dock(True)
    wait_until(lambda: plugin.manager.state in ("ready", "failed"), 150, "the backend to start")
    assert plugin.manager.state == "ready", plugin.manager.message
    yield plugin
    process = plugin.manager.process
    plugin.unload()
    assert process is None or process.state() == 0, "the backend the plugin started is still running"


@pytest.fixture
def naip_layer(qgis_new_project):
    layer = QgsRasterLayer(str(NAIP.resolve()), "naip")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


@pytest.fixture
def naip_dock(running_plugin, plugin_settings, naip_layer, tiny_model):
    """A dock of the running plugin set to segment the whole NAIP layer with the tiny model, no rasters."""
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.layerCombo.setLayer(naip_layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.modelCombo.setEditText(str(tiny_model))
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    return dock
