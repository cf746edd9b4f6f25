""""Train on my corrections" trains on the raster the reviewed result was segmented from, not on whatever
raster the Train tab had chosen before."""

from __future__ import annotations

import shutil

import pytest
from plugin_helpers import NAIP, TWO_CLASSES, review_loaded_result, write_result_file
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
)


@pytest.fixture
def segmented(tmp_path):
    """A raster file other than NAIP: the one the reviewed run segmented."""
    path = tmp_path / "segmented.tif"
    shutil.copy(NAIP, path)
    return str(path)


@pytest.fixture
def earlier_raster(bare_dock):
    """The raster the analyst trained on earlier in the session, still chosen in the Train tab."""
    layer = QgsRasterLayer(str(NAIP), "earlier")
    QgsProject.instance().addMapLayer(layer)
    bare_dock.form.trainRasterCombo.setLayer(layer)
    return layer


def test_corrections_train_on_the_segmented_raster_of_the_project(bare_dock, tmp_path, backend_home, segmented,
                                                                  earlier_raster):
    layer = QgsRasterLayer(segmented, "segmented")
    QgsProject.instance().addMapLayer(layer)
    request = review_loaded_result(bare_dock, tmp_path, segmented)
    assert request is not None and request["raster"] == segmented
    assert bare_dock.form.trainRasterCombo.currentLayer() is layer


def test_a_segmented_raster_no_longer_in_the_project_is_added_back(bare_dock, tmp_path, backend_home, segmented,
                                                                   earlier_raster):
    request = review_loaded_result(bare_dock, tmp_path, segmented)
    assert request is not None and request["raster"] == segmented
    added = bare_dock.form.trainRasterCombo.currentLayer()
    assert added.name() == "segmented" and QgsProject.instance().mapLayer(added.id()) is added


def test_corrections_of_a_layer_read_through_its_kept_vrt_train_on_that_layer(bare_dock, tmp_path, segmented):
    """A run on a file whose CRS was set in QGIS read the VRT the plugin keeps of it: training on the corrections
    takes the project's layer (read through the same VRT again), not a new layer of the VRT."""
    from qgis_farslip.extent import vrt_arguments, write_vrt
    from qgis_farslip.results import load_segment_result

    layer = QgsRasterLayer(segmented, "set crs")
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:26913"))
    QgsProject.instance().addMapLayer(layer)
    kept = write_vrt(*vrt_arguments(layer))
    vector = str(tmp_path / "result.gpkg")
    write_result_file(vector, "EPSG:26913", TWO_CLASSES)
    job = {"id": "job-1", "state": "done", "request": {"raster": kept, "out": vector},
           "result": {"outputs": {"vector": vector}, "run_id": "run-1",
                      "classes": [{"class": "water", "class_id": 0}, {"class": "forest", "class_id": 1}]}}
    bare_dock.review_tab.review(load_segment_result(job, "water, forest 12:00:00")[0])
    assert bare_dock.review_tab.source_raster() == (layer, "")


def test_a_raster_that_is_gone_is_named_and_training_waits(bare_dock, tmp_path, backend_home, earlier_raster):
    gone = str(tmp_path / "farslip-copy" / "web layer.tif")  # the run's temporary copy, removed after it
    request = review_loaded_result(bare_dock, tmp_path, gone)
    assert request is None, "training started on the raster the Train tab had chosen before"
    text = bare_dock.review_tab.form.reviewStatusLabel.text()
    assert gone in text and "choose the segmented raster there and press Train" in text, text
    assert bare_dock.form.labelsCombo.currentLayer().name() == "FarSLIP review"  # the corrections are ready


def test_a_dock_run_keeps_its_raster_on_the_result(naip_dock, naip_layer):
    """The real backend's finished job names the raster the run read: the result layer keeps it."""
    from plugin_helpers import run_dock_job
    from qgis_farslip.results import RASTER_PROPERTY

    naip_dock.form.classesEdit.setPlainText("water\nforest, trees")
    assert run_dock_job(naip_dock) == "done", naip_dock.last_error
    result = naip_dock.review_tab.layer()
    assert result is not None and result.customProperty(RASTER_PROPERTY) == str(NAIP.resolve())


def test_the_corrections_layer_is_not_offered_for_review(bare_dock, tmp_path, backend_home, segmented):
    """The corrections ("FarSLIP review", field cls) stay in the project after training on them: a dock opened
    then, or choosing them in the Review tab, broke on their missing class field."""
    review_loaded_result(bare_dock, tmp_path, segmented)
    corrections = bare_dock.form.labelsCombo.currentLayer()
    tab = bare_dock.review_tab
    tab.form.reviewLayerCombo.setLayer(corrections)
    tab.show_layer()
    assert tab.layer() is None
    assert tab.form.reviewStatusLabel.text() == "Choose a FarSLIP result (a layer with a quality field)."
