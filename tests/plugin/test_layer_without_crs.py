"""A raster QGIS shows without a CRS (a PNG with a world file): the dock says that Layer > Set CRS is enough for
a georeferenced file, before anything is sent; with a CRS set in QGIS the run goes ahead."""

from __future__ import annotations

import os

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
        "file, or coordinates without a CRS), choosing its CRS with Layer > Set CRS is enough: then press Run "
        "again. An image without coordinates must be georeferenced first (Raster > Georeferencer).")

    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:26914"))  # Layer > Set CRS
    parameters, prepare = bare_dock.segment_parameters()
    assert prepare is not None, "a VRT of the layer as QGIS sees it, with the CRS set in QGIS"
    assert parameters.class_lines == ["water", "grass"]
