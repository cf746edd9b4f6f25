"""Nodata as QGIS shows it: an 'Additional no data value' set in QGIS, or the file's own switched off, is what
the backend masks (through the layer's kept VRT), in the dock and in Processing; a nodata a raster file cannot
carry is refused in words."""

from __future__ import annotations

from pathlib import Path

import pytest
from osgeo import gdal
from plugin_helpers import NAIP, added, run_dock_job
from qgis.core import QgsGeometry, QgsProject, QgsRasterRange, QgsRectangle, QgsVectorLayer

STRIP_PX = 300  # a black strip along the left edge, 1,500 m wide on NAIP's 5 m pixels


def with_black_strip(path: Path, nodata: str) -> str:
    """NAIP's three bands with a black strip on the left, with the file's nodata `nodata` ('none' for none)."""
    dataset = gdal.Translate(str(path), str(NAIP), bandList=[1, 2, 3], noData=nodata)
    for number in range(1, 4):
        band = dataset.GetRasterBand(number)
        pixels = band.ReadAsArray()
        pixels[:, :STRIP_PX] = 0
        band.WriteArray(pixels)
    dataset = None
    return str(path)


def area_in_strip(vector: QgsVectorLayer, layer) -> float:
    extent = layer.extent()
    strip = QgsGeometry.fromRect(QgsRectangle(extent.xMinimum(), extent.yMinimum(),
                                              extent.xMinimum() + STRIP_PX * layer.rasterUnitsPerPixelX(),
                                              extent.yMaximum()))
    return sum(feature.geometry().intersection(strip).area() for feature in vector.getFeatures())


def strip_area(layer) -> float:
    return STRIP_PX * layer.rasterUnitsPerPixelX() * layer.height() * layer.rasterUnitsPerPixelY()


@pytest.fixture
def dock(running_plugin, plugin_settings, tiny_model, qgis_new_project):
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.classesEdit.setPlainText("water\ngrass\nroad")
    dock.form.modelCombo.setEditText(str(tiny_model))
    dock.form.regionChecksCheck.setChecked(False)
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    return dock


def run_on(dock, layer) -> QgsVectorLayer:
    dock.form.layerCombo.setLayer(layer)
    assert run_dock_job(dock) == "done", dock.last_error
    return dock.last_layers[0]


def test_a_nodata_value_set_in_qgis_is_masked_in_the_dock_and_in_processing(dock, tiny_model, tmp_path):
    import processing

    layer = added(with_black_strip(tmp_path / "strip.tif", "none"), "strip")
    for band in range(1, 4):
        layer.dataProvider().setUserNoDataValue(band, [QgsRasterRange(0, 0)])
    assert area_in_strip(run_on(dock, layer), layer) == 0
    out = str(tmp_path / "processing.gpkg")
    processing.run("farslip:segment_by_class_names", {
        "INPUT": layer, "CLASSES": "water\ngrass\nroad", "MODEL": str(tiny_model), "REGION_CHECKS": False,
        "OUTPUT": out})
    vector = QgsVectorLayer(out, "processing", "ogr")
    assert vector.featureCount() > 0 and area_in_strip(vector, layer) == 0
    # Without the value set in QGIS the same file's strip is classified (the test can tell the difference).
    plain = added(str(tmp_path / "strip.tif"), "plain")
    assert area_in_strip(run_on(dock, plain), plain) == pytest.approx(strip_area(plain))


def test_the_files_nodata_switched_off_in_qgis_is_classified(dock, tmp_path):
    layer = added(with_black_strip(tmp_path / "strip_nodata.tif", "0"), "strip")
    assert area_in_strip(run_on(dock, layer), layer) == 0  # the file's own nodata, used as QGIS shows it
    for band in range(1, 4):
        layer.dataProvider().setUseSourceNoDataValue(band, False)
    assert area_in_strip(run_on(dock, layer), layer) == pytest.approx(strip_area(layer))


@pytest.mark.parametrize("nodata, ranges, words", [
    ("none", [QgsRasterRange(0, 10)], "has a range of no data values set in QGIS (band 1: 0 to 10)"),
    ("0", [QgsRasterRange(255, 255)], "has more than one no data value in band 1 (0, 255: the file's own and one "
                                      "set in QGIS)"),
])
def test_a_nodata_a_file_cannot_carry_is_refused_in_words(dock, tmp_path, nodata, ranges, words):
    import processing
    from qgis.core import QgsProcessingException

    layer = added(with_black_strip(tmp_path / "strip.tif", nodata), "strip")
    layer.dataProvider().setUserNoDataValue(1, ranges)
    dock.form.layerCombo.setLayer(layer)
    before = set(QgsProject.instance().mapLayers())
    assert run_dock_job(dock) == "failed"
    assert f"Layer strip {words}" in dock.last_error
    assert set(QgsProject.instance().mapLayers()) == before
    with pytest.raises(QgsProcessingException, match="no data value"):
        processing.run("farslip:segment_by_class_names", {
            "INPUT": layer, "CLASSES": "water", "OUTPUT": str(tmp_path / "refused.gpkg")})
    assert not (tmp_path / "refused.gpkg").exists()
