"""New backend settings (or a new install) while a dock job runs on the backend: OK in the settings dialog
stopped the backend at once, and the job ended "The FarSLIP backend stopped while the job was running (it
crashed, ran out of memory or was closed)". The analyst now cancels the job or the switch waits for its end."""

from __future__ import annotations

import pytest
from osgeo import gdal
from plugin_helpers import NAIP, added, start_algorithm, wait_until
from qgis.core import QgsVectorLayer
from qgis.PyQt.QtWidgets import QMessageBox


def enlarged_naip(tmp_path) -> str:
    """NAIP enlarged 3x: a segmentation of it runs tens of seconds with the tiny model."""
    big = str(tmp_path / "big.tif")
    source = gdal.Open(str(NAIP))
    gdal.Translate(big, source, width=source.RasterXSize * 3, height=source.RasterYSize * 3)
    return big


def recording_stops(manager, monkeypatch) -> list[str]:
    events: list[str] = []
    stop = manager.stop
    monkeypatch.setattr(manager, "stop", lambda *args, **kwargs: (events.append("backend stopped"),
                                                                   stop(*args, **kwargs)))
    return events


@pytest.fixture
def running_segmentation(running_plugin, plugin_settings, tiny_model, qgis_new_project, tmp_path, monkeypatch):
    """The dock segmenting a 3x enlarged NAIP (tens of seconds), and a record of its end and of backend stops."""
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.layerCombo.setLayer(added(enlarged_naip(tmp_path), "big"))
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.modelCombo.setEditText(str(tiny_model))
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    dock.form.regionChecksCheck.setChecked(False)
    dock.form.classesEdit.setPlainText("water\ngrass\nroad")
    manager = running_plugin.manager
    events = recording_stops(manager, monkeypatch)
    dock.jobFinished.connect(events.append)
    manager.ensure()  # a test before stopped it (a hidden dock starts none after a switch)
    wait_until(lambda: manager.state == "ready", 120, "the backend")
    dock.run()
    wait_until(lambda: "Tile" in dock.form.statusLabel.text(), 120, "the segmentation to run")
    yield dock, events
    dock.jobFinished.disconnect(events.append)


def answer(monkeypatch, reply) -> list[str]:
    asked: list[str] = []

    def question(_parent, _title, text, *_args):
        asked.append(text)
        return reply

    monkeypatch.setattr(QMessageBox, "question", question)
    return asked


def test_the_switch_waits_for_the_running_segmentation_to_end(running_plugin, running_segmentation, monkeypatch,
                                                              tmp_path):
    from qgis_farslip import settings_dialog

    dock, events = running_segmentation
    asked = answer(monkeypatch, QMessageBox.No)
    chosen = settings_dialog.SettingsDialog.settings

    def edited(dialog):  # the analyst types another connection file and presses OK
        settings = chosen(dialog)
        settings.connection_file = str(tmp_path / "other.json")
        return settings

    monkeypatch.setattr(settings_dialog.SettingsDialog, "exec", lambda _dialog: True)
    monkeypatch.setattr(settings_dialog.SettingsDialog, "settings", edited)
    running_plugin.show_settings()
    assert asked == ["A segmentation is running on the FarSLIP backend. Cancel it and switch to the new backend "
                     "now? (No: the switch waits until it has ended.)"]
    assert events == [], "the backend was stopped under the running job"
    wait_until(lambda: "backend stopped" in events, 300, "the switch")
    assert events[:2] == ["done", "backend stopped"], (events, dock.form.statusLabel.text())


def test_cancel_and_switch_now_ends_the_job_as_cancelled(running_plugin, running_segmentation, monkeypatch):
    dock, events = running_segmentation
    answer(monkeypatch, QMessageBox.Yes)
    running_plugin.switch_backend()
    wait_until(lambda: "backend stopped" in events, 120, "the switch")
    assert events[:2] == ["cancelled", "backend stopped"], (events, dock.form.statusLabel.text())
    assert "crashed" not in dock.form.statusLabel.text()


def test_with_no_job_running_the_backend_switches_without_a_question(running_plugin, plugin_settings, monkeypatch):
    plugin_settings()
    running_plugin.create_dock()
    asked = answer(monkeypatch, QMessageBox.No)
    stopped: list[bool] = []
    stop = running_plugin.manager.stop
    monkeypatch.setattr(running_plugin.manager, "stop", lambda *a, **k: (stopped.append(True), stop(*a, **k)))
    running_plugin.switch_backend()
    assert asked == [] and stopped == [True]


@pytest.fixture
def running_algorithm(running_plugin, plugin_settings, qgis_processing, tiny_model, tmp_path, monkeypatch):
    """A Processing segmentation of the enlarged NAIP running on the plugin's backend (the dock idle)."""
    plugin_settings()
    running_plugin.create_dock()
    manager = running_plugin.manager
    manager.ensure()
    wait_until(lambda: manager.state == "ready", 120, "the backend")
    events = recording_stops(manager, monkeypatch)
    out = tmp_path / "processing.gpkg"
    run = start_algorithm({"INPUT": enlarged_naip(tmp_path), "CLASSES": "water\ngrass\nroad",
                           "MODEL": str(tiny_model), "REGION_CHECKS": False, "OUTPUT": str(out)})
    progress: list[float] = []
    run["task"].progressChanged.connect(progress.append)
    wait_until(lambda: progress and manager.processing_jobs(), 120, "the algorithm to run")
    run["task"].executed.connect(lambda ok, _results: events.append("done" if ok else "failed"))
    return run, events, out


def test_a_processing_job_is_asked_about_and_cancelled_before_the_switch(running_plugin, running_algorithm,
                                                                          monkeypatch):
    """Settings OK while a Processing algorithm ran on the backend stopped it under the algorithm ('The FarSLIP
    backend stopped while the job was running (it crashed ...)'): it is asked about as the dock's jobs are."""
    run, events, out = running_algorithm
    asked = answer(monkeypatch, QMessageBox.Yes)
    running_plugin.switch_backend()
    assert asked == ["A segmentation (Processing) is running on the FarSLIP backend. Cancel it and switch to the "
                     "new backend now? (No: the switch waits until it has ended.)"]
    wait_until(lambda: "backend stopped" in events, 120, "the switch")
    assert events[:2] == ["failed", "backend stopped"], (events, run["feedback"].errors)
    assert run["feedback"].errors == ["Cancelled to switch to the new FarSLIP backend; nothing was written. Run "
                                      "the algorithm again."]
    assert not out.exists()
    assert running_plugin.manager.processing_jobs() == []


def test_the_switch_waits_for_a_processing_job_to_end(running_plugin, running_algorithm, monkeypatch):
    run, events, out = running_algorithm
    answer(monkeypatch, QMessageBox.No)
    running_plugin.switch_backend()
    assert events == [], "the backend was stopped under the running algorithm"
    wait_until(lambda: "backend stopped" in events, 300, "the switch")
    assert events[:2] == ["done", "backend stopped"], (events, run["feedback"].errors)
    assert QgsVectorLayer(str(out), "out", "ogr").featureCount() > 0
