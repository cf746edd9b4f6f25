"""Requests the backend would refuse are refused in the dock (and Processing) with a sentence; a refusal
of the backend itself says what to change, with no "Open log" link that would tell nothing more."""

from __future__ import annotations

import pytest
from plugin_helpers import NAIP, run_dock_job
from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject, \
    QgsRasterLayer


def many_classes(count: int) -> str:
    return "\n".join(f"class {index}" for index in range(count))


def test_more_classes_than_the_backend_takes_are_refused_before_submitting(bare_dock, naip_layer):
    submitted = []
    bare_dock.manager.ensure = lambda: submitted.append("ensure")  # no backend is asked
    bare_dock.form.layerCombo.setLayer(naip_layer)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    bare_dock.form.classesEdit.setPlainText(many_classes(300))
    states = []
    bare_dock.jobFinished.connect(states.append)
    bare_dock.run()
    assert states == ["failed"] and not submitted
    assert bare_dock.form.statusLabel.text() == "At most 250 classes per run; you typed 300."
    assert not bare_dock.form.statusMessage.isVisibleTo(bare_dock), "a refusal has nothing for the log to add"

    bare_dock.form.classesEdit.setPlainText(many_classes(250))
    parameters, _prepare = bare_dock.segment_parameters()
    assert len(parameters.class_lines) == 250


def test_processing_refuses_more_classes_than_the_backend_takes(farslip, qgis_new_project):
    from qgis_farslip.processing_provider import SegmentByClassNames

    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    algorithm = SegmentByClassNames(lambda: None)
    algorithm.initAlgorithm()
    with pytest.raises(QgsProcessingException, match=r"^At most 250 classes per run; you typed 300\.$"):
        algorithm.processAlgorithm({"INPUT": layer, "CLASSES": many_classes(300), "OUTPUT": "TEMPORARY_OUTPUT"},
                                   QgsProcessingContext(), QgsProcessingFeedback())


LONG_LINE_REFUSAL = (r"^Class 2 \(a{40}\.\.\.\) is 1001 characters long; a class line holds at most 1000: name the "
                     r"class in a few words\.$")


def test_a_class_line_longer_than_the_backend_takes_is_refused_in_a_sentence(bare_dock, naip_layer):
    from qgis_farslip.dock import UserError
    from qgis_farslip.processing_provider import SegmentByClassNames

    bare_dock.form.layerCombo.setLayer(naip_layer)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    bare_dock.form.classesEdit.setPlainText("water\n" + "a" * 1001)
    with pytest.raises(UserError, match=LONG_LINE_REFUSAL):
        bare_dock.segment_parameters()
    algorithm = SegmentByClassNames(lambda: None)
    algorithm.initAlgorithm()
    with pytest.raises(QgsProcessingException, match=LONG_LINE_REFUSAL):
        algorithm.processAlgorithm({"INPUT": naip_layer, "CLASSES": "water\n" + "a" * 1001,
                                    "OUTPUT": "TEMPORARY_OUTPUT"}, QgsProcessingContext(), QgsProcessingFeedback())
    bare_dock.form.classesEdit.setPlainText("water\n" + "a" * 1000)
    assert bare_dock.segment_parameters()[0].class_lines[1] == "a" * 1000


def test_a_request_the_backend_refuses_offers_no_log(naip_dock, tmp_path):
    naip_dock.form.classesEdit.setPlainText("water\ngrass")
    naip_dock.form.modelCombo.setEditText(str(tmp_path / "no-such-model.pt"))
    assert run_dock_job(naip_dock) == "failed"
    text = naip_dock.form.statusLabel.text()
    assert "no-such-model.pt" in text, text
    assert "farslip:log" not in naip_dock.form.statusMessage.text()
    assert not naip_dock.form.statusMessage.isVisibleTo(naip_dock)
