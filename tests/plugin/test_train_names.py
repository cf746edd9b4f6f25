"""New model names in any script, in the Train tab and in Processing; no backend needed."""

from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import NAIP
from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject, \
    QgsRasterLayer, QgsVectorLayer


@pytest.fixture
def train_form(bare_dock, backend_home):
    from qgis_farslip.train_tab import default_models_dir

    layer = QgsRasterLayer(str(NAIP), "航空写真")
    labels = QgsVectorLayer(str(NAIP.parent / "solaris_geotiff_labels.geojson"), "labels", "ogr")
    QgsProject.instance().addMapLayers([layer, labels])
    form = bare_dock.form
    form.trainRasterCombo.setLayer(layer)
    form.labelsCombo.setLayer(labels)
    form.classFieldCombo.setField("building")
    os.makedirs(default_models_dir(), exist_ok=True)
    return form


def test_a_model_name_in_another_script_is_kept(bare_dock, train_form):
    from qgis_farslip.train_tab import default_models_dir

    train_form.modelNameEdit.setText(" 森林 2024 ")
    request, _prepare, out = bare_dock.train_tab.build_request()
    assert out == request["out"] == os.path.join(default_models_dir(), "森林_2024")


@pytest.mark.parametrize("typed", ["", "  ", "///", "..."])
def test_a_name_with_nothing_usable_falls_back_to_the_raster_and_the_time(bare_dock, train_form, typed):
    from qgis_farslip.train_tab import default_models_dir

    train_form.modelNameEdit.setText(typed)
    _request, _prepare, out = bare_dock.train_tab.build_request()
    assert os.path.dirname(out) == default_models_dir(), "the model would be written as the models folder itself"
    assert re.fullmatch(r"航空写真-\d{8}-\d{4}", os.path.basename(out)), out


def test_an_existing_model_is_named_in_the_refusal(bare_dock, train_form):
    from qgis_farslip.train_tab import default_models_dir

    os.makedirs(os.path.join(default_models_dir(), "森林"), exist_ok=True)
    train_form.modelNameEdit.setText("森林")
    bare_dock.train_tab.train()
    text = train_form.trainLog.toPlainText()
    assert "A model called 森林 exists already" in text, text


def test_processing_names_the_model_as_the_train_tab_does(farslip, backend_home, qgis_new_project):
    from qgis_farslip.processing_provider import TrainOnLabels
    from qgis_farslip.train_tab import default_models_dir

    layer = QgsRasterLayer(str(NAIP), "航空写真")
    QgsProject.instance().addMapLayer(layer)
    os.makedirs(os.path.join(default_models_dir(), "森林"), exist_ok=True)
    algorithm = TrainOnLabels(lambda: None)
    algorithm.initAlgorithm()
    with pytest.raises(QgsProcessingException, match="A model called 森林 exists already"):
        algorithm.processAlgorithm({"INPUT": layer, "NAME": "森林"}, QgsProcessingContext(), QgsProcessingFeedback())
