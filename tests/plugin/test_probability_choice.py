"""The "Show probability of" combo follows its probability raster: it offers nothing once the raster is removed
or the project closed, and the raster of a project opened again is offered with the class it shows."""

from __future__ import annotations

import numpy as np
import pytest
from osgeo import gdal, osr
from plugin_helpers import TWO_CLASSES, write_result_file
from qgis.core import QgsProject

CLASSES = [{"class": "water", "class_id": 0, "polygons": 1}, {"class": "forest", "class_id": 1, "polygons": 1}]


def probability_raster(path: str) -> None:
    dataset = gdal.GetDriverByName("GTiff").Create(path, 8, 8, 2, gdal.GDT_Float32)
    dataset.SetGeoTransform((0, 10, 0, 80, 0, -10))
    crs = osr.SpatialReference()
    crs.ImportFromEPSG(26914)
    dataset.SetProjection(crs.ExportToWkt())
    for band in (1, 2):
        dataset.GetRasterBand(band).WriteArray(np.full((8, 8), 0.25 * band, dtype=np.float32))
    dataset = None


@pytest.fixture
def offered(bare_dock, tmp_path):
    """The dock after a run with a probability raster was loaded."""
    vector, probabilities = str(tmp_path / "r.gpkg"), str(tmp_path / "r_probabilities.tif")
    write_result_file(vector, "EPSG:26914", TWO_CLASSES)
    probability_raster(probabilities)
    job = {"id": "j1", "state": "done", "request": {"raster": ""},
           "result": {"run_id": "r1", "outputs": {"vector": vector, "prob_raster": probabilities},
                      "classes": CLASSES}}
    bare_dock._run_name = "water, forest 12:00:00"
    assert bare_dock._load_result(job) == "done", bare_dock.last_error
    combo = bare_dock.form.probClassCombo
    assert [combo.itemText(index) for index in range(combo.count())] == ["water", "forest"]
    assert combo.isEnabled()
    return bare_dock


def shown(dock) -> tuple[list[str], bool]:
    combo = dock.form.probClassCombo
    return [combo.itemText(index) for index in range(combo.count())], combo.isEnabled()


def test_the_combo_offers_nothing_once_its_raster_is_removed(offered):
    raster = offered.probability.layer
    QgsProject.instance().removeMapLayer(raster.id())
    assert shown(offered) == ([], False)
    assert offered.probability.layer is None


def test_the_combo_offers_nothing_once_the_project_is_closed(offered):
    QgsProject.instance().clear()
    assert shown(offered) == ([], False)


def test_a_reopened_projects_probability_raster_is_offered_with_the_class_it_shows(offered, tmp_path):
    offered.form.probClassCombo.setCurrentText("forest")
    raster = offered.probability.layer
    assert raster.customProperty("farslip/probability_class") == "forest"
    project = QgsProject.instance()
    assert project.write(str(tmp_path / "p.qgz"))
    project.clear()
    assert shown(offered) == ([], False)
    assert project.read(str(tmp_path / "p.qgz"))
    assert shown(offered) == (["water", "forest"], True)
    assert offered.form.probClassCombo.currentText() == "forest"
    offered.form.probClassCombo.setCurrentText("water")  # it styles the reopened raster
    reopened = [layer for layer in project.mapLayers().values()
                if layer.customProperty("farslip/kind") == "prob_raster"]
    assert [layer.customProperty("farslip/probability_class") for layer in reopened] == ["water"]
