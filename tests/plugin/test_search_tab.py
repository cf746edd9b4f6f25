"""The Search tab end to end: the plugin's own backend indexes a shared raster, the hits layer and list appear."""

from __future__ import annotations

import math

import pytest
from osgeo import gdal
from plugin_helpers import NAIP, run_dock_job, wait_until
from qgis.core import (
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)


@pytest.fixture
def search_tab(running_plugin, plugin_settings, naip_layer, tiny_model):
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.modelCombo.setEditText(str(tiny_model))
    tab = dock.search_tab
    tab.form.searchRasterCombo.setLayer(naip_layer)
    tab.form.topSpin.setValue(5)
    return tab


def run_search(tab, like=None, timeout: float = 240.0) -> str:
    states = []
    tab.searchFinished.connect(states.append)
    try:
        tab.search(like=like)
        wait_until(lambda: states, timeout, "the search to finish")
    finally:
        tab.searchFinished.disconnect(states.append)
    return states[0]


def test_search_tab_loads_a_ranked_hits_layer_and_zooms_to_a_hit(search_tab, naip_layer, qgis_iface):
    dock = search_tab.dock
    tabs = dock.form.tabs
    assert "Search" in [tabs.tabText(i) for i in range(tabs.count())]
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error

    layer = search_tab.hits_layer
    assert isinstance(layer, QgsVectorLayer) and layer.isValid()
    assert layer.crs() == naip_layer.crs()
    assert layer.featureCount() == 5
    assert [f["rank"] for f in layer.getFeatures()] == [1, 2, 3, 4, 5]
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "score"
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"
    assert layer.id() in QgsProject.instance().mapLayers()
    assert naip_layer.extent().buffered(1.0).contains(layer.extent())

    hits = search_tab.form.hitsList
    assert hits.count() == 5 and hits.item(0).text().startswith("1.")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(naip_layer.crs())
    canvas.setExtent(naip_layer.extent())
    second = hits.item(1)
    hits.setCurrentItem(second)
    search_tab.zoom_to_hit(second)
    second_feature = next(f for f in layer.getFeatures() if f["rank"] == 2)
    hit_box = search_tab.hit_rectangle(second)
    assert hit_box.toString(0) == second_feature.geometry().boundingBox().toString(0)
    assert canvas.extent().contains(hit_box)
    assert canvas.extent().area() < naip_layer.extent().area() / 2
    assert abs(canvas.extent().center().x() - hit_box.center().x()) < 10
    assert abs(canvas.extent().center().y() - hit_box.center().y()) < 10

    search_tab.use_hit_as_extent()
    rectangle, crs = dock.drawn_extent
    assert crs == naip_layer.crs()
    assert rectangle.toString(0) == hit_box.toString(0)
    assert dock.extent.pixel_window(naip_layer) is None  # north up: the hit is its box, sent as the bbox
    assert dock.form.extentCombo.currentData() == "drawn"
    assert dock.form.tabs.currentIndex() == 0 and dock.form.layerCombo.currentLayer() == naip_layer


def test_query_by_example_from_a_map_click(search_tab, naip_layer, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(naip_layer.crs())
    centre = naip_layer.extent().center()
    search_tab.form.likeButton.setChecked(True)
    assert canvas.mapTool() is search_tab.point_tool
    states = []
    search_tab.searchFinished.connect(states.append)
    search_tab.point_tool.canvasClicked.emit(QgsPointXY(centre.x(), centre.y()), 1)
    wait_until(lambda: states, 240, "the search by example to finish")
    assert states == ["done"], search_tab.last_error
    assert not search_tab.form.likeButton.isChecked()
    layer = search_tab.hits_layer
    assert layer.featureCount() == 5
    assert all(not f.geometry().contains(QgsPointXY(centre.x(), centre.y())) for f in layer.getFeatures())
    assert all(f["query"].startswith("like ") for f in layer.getFeatures())


def test_empty_sentence_is_a_message_not_a_job(search_tab):
    search_tab.form.sentencesEdit.setPlainText("   ")
    assert run_search(search_tab, timeout=10) == "failed"
    assert "Type a sentence" in search_tab.last_error
    assert search_tab.task is None


def rotated_copy(path: str, degrees: float) -> str:
    """NAIP on a grid turned by `degrees` (a geotransform with rotation terms), same pixels and pixel size."""
    source = gdal.Open(str(NAIP))
    x0, size, _b, y0, _d, _e = source.GetGeoTransform()
    turn = math.radians(degrees)
    copy = gdal.GetDriverByName("GTiff").CreateCopy(path, source)
    copy.SetGeoTransform((x0, size * math.cos(turn), size * math.sin(turn),
                          y0, size * math.sin(turn), -size * math.cos(turn)))
    copy = None
    return path


def test_a_hit_on_a_rotated_raster_used_as_the_extent_segments_the_hit_and_not_its_envelope(search_tab, tmp_path):
    """On a grid turned by 30 degrees a hit's envelope holds almost twice the hit, much of it raster around it:
    the segment run on the hit covers the hit's footprint and stops at its edges."""
    layer = QgsRasterLayer(rotated_copy(str(tmp_path / "rotated.tif"), 30.0), "rotated")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    search_tab.form.searchRasterCombo.setLayer(layer)
    search_tab.form.topSpin.setValue(3)
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error
    hits = search_tab.form.hitsList
    hits.setCurrentItem(hits.item(0))
    footprint = next(f for f in search_tab.hits_layer.getFeatures() if f["rank"] == 1).geometry()
    envelope = QgsGeometry.fromRect(footprint.boundingBox())
    assert envelope.area() > 1.5 * footprint.area()  # the corners of the envelope reach well beyond the hit

    search_tab.use_hit_as_extent()
    dock = search_tab.dock
    assert dock.form.layerCombo.currentLayer() is layer and dock.form.extentCombo.currentData() == "drawn"
    dock.form.classesEdit.setPlainText("water\ngrass")
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    assert run_dock_job(dock) == "done", dock.last_error
    polygons = QgsGeometry.unaryUnion([f.geometry() for f in dock.last_layers[0].getFeatures()])
    pixel = 5.0
    assert footprint.difference(polygons).area() < pixel ** 2, "the hit is not covered"
    outside = polygons.difference(footprint.buffer(pixel, 1)).area()
    assert outside < pixel ** 2, f"{outside / pixel ** 2:.0f} pixels segmented beyond the hit"
