"""A raster QGIS shows without a CRS (a PNG with a world file): the dock says that Layer > Set CRS is enough for
a georeferenced file, before anything is sent; with a CRS set in QGIS the run goes ahead."""

from __future__ import annotations

import os

import pytest
from osgeo import gdal
from plugin_helpers import NAIP
from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer


def png_with_world_file(folder) -> str:
    path = str(folder / "scan.png")
    gdal.Translate(path, str(NAIP), format="PNG", bandList=[1, 2, 3], creationOptions=["WORLDFILE=YES"])
    if os.path.exists(path + ".aux.xml"):  # where GDAL wrote the CRS: this file has only its world file
        os.remove(path + ".aux.xml")
    return path


def test_a_layer_without_a_crs_is_refused_with_set_crs_in_words(bare_dock, tmp_path):
    submitted = []
    bare_dock.manager.ensure = lambda: submitted.append("ensure")
    layer = QgsRasterLayer(png_with_world_file(tmp_path), "scan")
    assert layer.isValid() and not layer.crs().isValid()
    QgsProject.instance().addMapLayer(layer)
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    bare_dock.form.classesEdit.setPlainText("water\ngrass")
    states = []
    bare_dock.jobFinished.connect(states.append)
    bare_dock.run()
    assert states == ["failed"] and submitted == []
    assert bare_dock.form.statusLabel.text() == (
        "The layer scan has no coordinate reference system (CRS) in QGIS. If the file is georeferenced (a world "
        "file, or coordinates without a CRS), choosing its CRS with Layer > Set CRS is enough: then run again. "
        "An image without coordinates must be georeferenced first (Raster > Georeferencer).")

    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:26914"))  # Layer > Set CRS
    parameters, prepare = bare_dock.segment_parameters()
    assert prepare is not None, "a VRT of the layer as QGIS sees it, with the CRS set in QGIS"
    assert parameters.class_lines == ["water", "grass"]


@pytest.fixture
def provider(farslip, qgis_processing):
    """The FarSLIP algorithms in Processing (a refusal comes before any backend is asked for)."""
    from qgis.core import QgsApplication
    from qgis_farslip.processing_provider import FarslipProvider

    registry = QgsApplication.processingRegistry()
    own = FarslipProvider(lambda: None) if registry.providerById("farslip") is None else None
    if own is not None:
        registry.addProvider(own)
    yield
    if own is not None:
        registry.removeProvider(own)


def test_search_and_processing_refuse_a_layer_without_a_crs_in_the_same_words(bare_dock, provider, tmp_path):
    import processing
    from qgis.core import QgsProcessingException
    from qgis_farslip.search_tab import UserError

    layer = QgsRasterLayer(png_with_world_file(tmp_path), "scan")
    QgsProject.instance().addMapLayer(layer)
    bare_dock.search_tab.form.searchRasterCombo.setLayer(layer)
    bare_dock.search_tab.form.sentencesEdit.setPlainText("a pond")
    with pytest.raises(UserError, match=r"has no coordinate reference system \(CRS\) in QGIS.*Layer > Set CRS"):
        bare_dock.search_tab.build_request()
    with pytest.raises(QgsProcessingException, match=r"Layer > Set CRS is enough"):
        processing.run("farslip:segment_by_class_names", {
            "INPUT": layer, "CLASSES": "water", "OUTPUT": str(tmp_path / "refused.gpkg")})
    assert not (tmp_path / "refused.gpkg").exists()
