"""Features selected in the labels layer: the Train tab sent all the layer's polygons, silently; as QGIS's own
tools it now offers "Selected features only" (ticked when there is a selection) and says which it trains on."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import NAIP, TWO_CLASSES, write_result_file
from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer


@pytest.fixture
def labels(bare_dock, backend_home, tmp_path):
    from qgis_farslip.train_tab import default_models_dir

    path = str(tmp_path / "labels.gpkg")
    write_result_file(path, "EPSG:26914", (*TWO_CLASSES, ("road", 0.4)))
    layer = QgsVectorLayer(path, "labels", "ogr")
    raster = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayers([raster, layer])
    form = bare_dock.form
    form.trainRasterCombo.setLayer(raster)
    form.labelsCombo.setLayer(layer)
    form.classFieldCombo.setField("class")
    os.makedirs(default_models_dir(), exist_ok=True)
    return layer


def sent(request) -> list[str]:
    return sorted(f["class"] for f in QgsVectorLayer(request["labels"], "sent", "ogr").getFeatures())


def test_the_selected_features_only_are_trained_on_and_said(bare_dock, labels, monkeypatch):
    tab = bare_dock.train_tab
    check = tab.selected_only_check
    assert not check.isEnabled() and not check.isChecked()  # no selection: all polygons, nothing to say
    request = tab.build_request()[0]
    assert request["labels"] == labels.source() and sent(request) == ["forest", "road", "water"]

    labels.selectByIds([f.id() for f in labels.getFeatures() if f["class"] != "forest"])
    assert check.isEnabled() and check.isChecked()
    request = tab.build_request()[0]
    assert sent(request) == ["road", "water"]
    started = []
    monkeypatch.setattr(bare_dock.manager, "state", "ready")
    monkeypatch.setattr(bare_dock.manager, "connection", object())
    monkeypatch.setattr(tab.runner, "start", lambda *args: started.append(args[3]))
    bare_dock.form.modelNameEdit.setText("selected")
    tab.train()
    assert sent(started[0]) == ["road", "water"]
    assert "Training on the 2 selected polygons of labels." in bare_dock.form.trainLog.toPlainText()

    check.setChecked(False)  # the user unticks it: all of them, and the log says so
    bare_dock.form.modelNameEdit.setText("all")
    tab.train()
    assert sent(started[1]) == ["forest", "road", "water"]
    assert "Training on all 3 polygons of labels (2 selected;" in bare_dock.form.trainLog.toPlainText()

    labels.removeSelection()
    assert not check.isEnabled() and not check.isChecked()
