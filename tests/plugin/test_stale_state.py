"""Nothing stale on screen: map tool after Draw, progress after an error, banner while restarting, Train log."""

from __future__ import annotations

import pytest
from plugin_helpers import NAIP
from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle
from qgis.gui import QgsMapToolPan


@pytest.fixture
def dock(bare_dock):
    return bare_dock


def test_drawing_hands_the_map_back_to_the_tool_the_user_had(dock, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    pan = QgsMapToolPan(canvas)
    canvas.setMapTool(pan)
    dock.extent.start_drawing()
    assert canvas.mapTool() is dock.extent.map_tool
    dock.extent.map_tool.extentDrawn.emit(QgsRectangle(0, 0, 10, 10))
    assert canvas.mapTool() is pan
    assert dock.form.extentCombo.currentData() == "drawn"


def test_an_error_after_a_finished_run_does_not_leave_the_bar_at_100(dock):
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.form.progressBar.setValue(100)  # the previous run
    dock.form.classesEdit.setPlainText("")
    dock.run()
    assert dock.form.progressBar.value() == 0
    assert "at least one class" in dock.form.statusLabel.text()


def test_an_old_failure_banner_goes_away_while_the_backend_restarts(dock):
    dock.manager.failed.emit("<b>The FarSLIP backend could not be started</b>")
    assert dock.form.backendMessage.isVisibleTo(dock)
    dock.manager.stateChanged.emit("starting")
    assert not dock.form.backendMessage.isVisibleTo(dock)
    assert dock.form.deviceLabel.text() == "Backend: starting..."


def test_train_tab_reports_a_failure_once_and_explains_its_methods(dock):
    tab = dock.train_tab
    tab._job_updated({"state": "running", "progress": 0.5, "eta_s": 125, "message": "epoch 1/2: loss 0.7"})
    assert dock.form.trainProgressBar.format().endswith(" - About 2 min 5 s left")
    tab._job_updated({"state": "failed", "progress": 0.5, "message": "The labels are empty."})
    tab._job_finished("failed", {}, "The labels are empty.")
    assert dock.form.trainLog.toPlainText().count("The labels are empty.") == 1
    assert dock.form.trainProgressBar.format() == "%p%"
    tips = [dock.form.methodCombo.itemData(i, 3) for i in range(dock.form.methodCombo.count())]  # ToolTipRole
    assert [dock.form.methodCombo.itemText(i) for i in range(3)] == ["lora", "last-blocks", "full"]
    assert all(tip and len(tip) > 20 for tip in tips)
