"""The built zip installs like "Install from ZIP" and the plugin loads and unloads cleanly."""

from __future__ import annotations

import configparser
import zipfile

from qgis.core import QgsApplication


def test_zip_holds_the_plugin_folder_with_metadata_licence_icons_presets_and_ui(plugin_zip):
    names = set(zipfile.ZipFile(plugin_zip).namelist())
    assert {"qgis_farslip/__init__.py", "qgis_farslip/metadata.txt", "qgis_farslip/LICENSE",
            "qgis_farslip/ui/dock.ui", "qgis_farslip/ui/settings_dialog.ui",
            "qgis_farslip/resources/icons/farslip.png"} <= names
    assert any(name.startswith("qgis_farslip/resources/presets/") for name in names)
    assert all(name.startswith("qgis_farslip/") for name in names)
    assert not any("__pycache__" in name or name.endswith(".pyc") or "/ui_" in name for name in names)


def test_metadata_has_every_field_plugins_qgis_org_requires(plugin_zip):
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read_string(zipfile.ZipFile(plugin_zip).read("qgis_farslip/metadata.txt").decode("utf-8"))
    general = parser["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                "repository", "tracker", "homepage", "category", "icon", "tags", "experimental", "license"):
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert general["license"] == "GPL-2.0-or-later"


def test_plugin_loads_with_class_factory_and_unloads_without_errors(farslip, qgis_iface):
    plugin = farslip.classFactory(qgis_iface)
    plugin.initGui()
    registry = QgsApplication.processingRegistry()
    assert registry.providerById("farslip") is not None
    dock = plugin.create_dock()
    assert dock.form.presetCombo.count() > 1  # bundled presets, before any backend answers
    plugin.unload()
    assert registry.providerById("farslip") is None
    assert plugin.dock is None and plugin.manager is None
