"""The Review tab's estimated mIoU is the shown result's own: choosing an earlier result showed the latest run's
estimate under it."""

from __future__ import annotations

import json

from plugin_helpers import TWO_CLASSES, write_result_file
from qgis.core import QgsProject, QgsVectorLayer

NO_ESTIMATE = "No label-free estimate of mIoU is recorded for this layer."


def result(tmp_path, name: str) -> QgsVectorLayer:
    path = str(tmp_path / f"{name}.gpkg")
    write_result_file(path, "EPSG:26914", TWO_CLASSES)
    layer = QgsVectorLayer(path, name, "ogr")
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_each_result_shows_its_own_runs_estimate(bare_dock, tmp_path):
    first, second, opened = result(tmp_path, "first"), result(tmp_path, "second"), result(tmp_path, "opened")
    tab = bare_dock.review_tab
    label = tab.form.estimateLabel
    tab.review(first, 0.42)
    assert label.text() == "Estimated mIoU of this run (no labels used): 42%"
    tab.review(second, 0.61)
    assert label.text().endswith("61%")
    tab.form.reviewLayerCombo.setLayer(first)
    assert label.text().endswith("42%")
    tab.form.reviewLayerCombo.setLayer(opened)  # a file opened in QGIS, no report beside it
    assert label.text() == NO_ESTIMATE
    tab.review(second, None)  # a run without an estimate says none, not the one shown before
    tab.review(first, None)
    assert label.text().endswith("42%")


def test_a_result_opened_from_its_file_shows_its_reports_estimate(bare_dock, tmp_path):
    layer = result(tmp_path, "run")
    report = {"outputs": {"vector": str(tmp_path / "run.gpkg")}, "quality": {"estimated_miou": 0.33}}
    (tmp_path / "run.report.json").write_text(json.dumps(report))
    other = result(tmp_path, "other")  # its report is another file's: not its own
    report["quality"]["estimated_miou"] = 0.9
    (tmp_path / "other.report.json").write_text(json.dumps(report))
    tab = bare_dock.review_tab
    tab.form.reviewLayerCombo.setLayer(layer)
    assert tab.form.estimateLabel.text() == "Estimated mIoU of this run (no labels used): 33%"
    tab.form.reviewLayerCombo.setLayer(other)
    assert tab.form.estimateLabel.text() == NO_ESTIMATE
