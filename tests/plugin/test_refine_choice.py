"""The dock's "Refine outlines" choice: the refined layer comes on top of the coarse one, to compare."""

from __future__ import annotations

import pytest
from plugin_helpers import run_dock_job
from qgis.core import QgsProject


@pytest.fixture
def dock(naip_dock):
    return naip_dock


def test_refined_outlines_load_above_the_coarse_ones(dock, naip_layer):
    dock.form.classesEdit.setPlainText("water\ngrass\nroad")
    dock.form.refineCombo.setCurrentIndex(dock.form.refineCombo.findData("edges"))
    request, _ = dock.build_request()
    assert request["refine"] == "edges"
    assert run_dock_job(dock) == "done", dock.last_error
    refined, coarse = dock.last_layers[:2]
    assert coarse.name() == refined.name() + " coarse"
    assert refined.isValid() and coarse.isValid() and coarse.featureCount() > 0
    order = [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(refined) < order.index(coarse) < order.index(naip_layer)
    assert refined.renderer().type() == coarse.renderer().type() == "categorizedSymbol"


def test_sam_is_offered_only_when_the_backend_has_sam_weights(dock):
    item = dock.form.refineCombo.model().item(dock.form.refineCombo.findData("sam"))
    missing = {"name": "sam-vit-b", "present": False, "hf_repo": "facebook/sam-vit-base",
               "hf_file": "model.safetensors", "expected_path": "/weights/sam-vit-base.safetensors"}
    dock.set_sam_models([missing])
    assert not item.isEnabled() and "sam-vit-base.safetensors" in item.toolTip()
    dock.set_sam_models([dict(missing, present=True)])
    assert item.isEnabled() and "sam-vit-b" in item.toolTip()
