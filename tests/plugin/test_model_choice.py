"""Choosing a model without typing paths, remembered choices, and messages in GIS words (no backend)."""

from __future__ import annotations

import json

import pytest
from qgis.core import QgsProject
from qgis.PyQt.QtCore import Qt

MODELS = {"default": "farslip2-vit-b-16", "models": [
    {"name": "farslip2-vit-b-16", "present": False, "kind": "registry"},
    {"name": "clip-vit-b-16", "present": True, "kind": "registry"},
    {"name": "georsclip-vit-b-32", "present": False, "kind": "registry"},
]}


@pytest.fixture
def dock(bare_dock):
    return bare_dock


def test_missing_models_are_listed_disabled_and_offered_for_download(dock):
    dock.set_models(MODELS)
    combo = dock.form.modelCombo
    assert combo.itemText(0) == "farslip2-vit-b-16 (not downloaded)"
    assert not combo.model().item(0).flags() & Qt.ItemIsEnabled
    assert combo.model().item(1).flags() & Qt.ItemIsEnabled
    # The backend's default is missing: the first model that is here is preselected instead.
    assert dock.model_name() == "clip-vit-b-16"
    actions = dock.models.download_menu.actions()
    assert [action.text() for action in actions] == ["farslip2-vit-b-16", "georsclip-vit-b-32"]
    assert dock.form.downloadModelButton.isEnabled()
    wanted = []
    dock.models.downloadRequested.connect(wanted.append)
    actions[1].trigger()
    assert wanted == ["georsclip-vit-b-32"]
    # The Train tab's base model list follows, disabled entries included.
    assert not dock.form.baseModelCombo.model().item(0).flags() & Qt.ItemIsEnabled


def test_a_base_model_typed_in_the_train_tab_survives_a_model_list_refresh(dock, tmp_path):
    dock.form.baseModelCombo.setEditText(str(tmp_path / "base.pt"))
    dock.set_models(MODELS)
    assert dock.form.baseModelCombo.currentText() == str(tmp_path / "base.pt")


def test_a_browsed_fine_tuned_folder_fills_in_its_classes_and_warns_when_they_differ(dock, tmp_path):
    folder = tmp_path / "roofs"
    folder.mkdir()
    (folder / "farslip_model.json").write_text(json.dumps({"class_lines": ["roof, building", "background"]}))
    dock.form.classesEdit.setPlainText("")
    dock.models.use_path(str(folder))
    assert dock.model_name() == str(folder)
    assert dock.class_lines() == ["roof, building", "background"]
    assert dock.last_error == ""

    dock.form.classesEdit.setPlainText("water\ntree")
    dock.models.use_path(str(folder))
    assert dock.class_lines() == ["water", "tree"], "typed classes are never overwritten"
    # Two class lines, one with synonyms: quoted one by one, so they do not read as three classes.
    assert "trained on the classes 'roof, building'; 'background';" in dock.last_error, dock.last_error


def test_last_model_classes_and_options_are_remembered_in_the_project_and_the_settings(dock, farslip,
                                                                                      qgis_iface, tmp_path):
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.dock import FarslipDock
    from qgis_farslip.remembered import LastChoices

    checkpoint = tmp_path / "mine.pt"
    checkpoint.write_bytes(b"x")
    dock.models.use_path(str(checkpoint))
    dock.form.classesEdit.setPlainText("water\nreed")
    dock.form.thresholdSpin.setValue(0.35)
    dock.form.probRasterCheck.setChecked(True)
    dock.form.regionChecksCheck.setChecked(False)
    dock.choices().save()
    project = QgsProject.instance()
    assert project.readEntry("farslip", "classes")[0] == "water\nreed"
    assert project.readDoubleEntry("farslip", "threshold")[0] == pytest.approx(0.35)

    other = FarslipDock(qgis_iface, BackendManager())  # as after a restart of QGIS
    try:
        assert other.model_name() == str(checkpoint)
        assert other.class_lines() == ["water", "reed"]
        assert other.form.thresholdSpin.value() == pytest.approx(0.35)
        assert other.form.probRasterCheck.isChecked()
        assert not other.form.regionChecksCheck.isChecked()
        # A project's own entries win over the user's last choices.
        project.writeEntry("farslip", "classes", "tree")
        other.restore_choices()
        assert other.class_lines() == ["tree"]
    finally:
        other.close_down()
        LastChoices().save()


def test_status_text_is_plain_text_so_quotes_are_not_shown_as_html_entities(dock, qgis_new_project):
    dock.form.classesEdit.setPlainText("water")
    dock.run()  # no raster layer chosen
    assert dock.form.statusLabel.textFormat() == Qt.PlainText
    dock.show_status("The file 'x.tif' can't be read.", error=True)
    assert dock.form.statusLabel.text() == "The file 'x.tif' can't be read."
    assert "&#x27;" not in dock.form.statusLabel.text()


def test_an_unreachable_backend_is_described_without_errno(farslip):
    from qgis_farslip.client import BackendClient, BackendUnreachable, Connection

    with pytest.raises(BackendUnreachable) as caught:
        BackendClient(Connection("http://127.0.0.1:9"), timeout=2).health()
    assert "Errno" not in str(caught.value) and "does not answer (connection refused)" in str(caught.value)


def test_the_install_message_offers_install_and_settings_actions(dock):
    from qgis_farslip.backend_manager import install_help

    text = install_help("")
    assert 'href="farslip:install"' in text and 'href="farslip:settings"' in text
    assert "source code" not in text
    opened = []
    dock.installRequested.connect(lambda: opened.append("install"))
    dock.settingsRequested.connect(lambda: opened.append("settings"))
    dock.do_action("farslip:install")
    dock.do_action("farslip:settings")
    assert opened == ["install", "settings"]
