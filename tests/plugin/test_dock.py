"""The dock's inputs: class lines, presets, extents and CRSs; no backend needed."""

from __future__ import annotations

import pytest
from plugin_helpers import NAIP
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMultiBandColorRenderer,
    QgsPalettedRasterRenderer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleBandGrayRenderer,
)


@pytest.fixture
def dock(farslip, qgis_iface, plugin_settings):
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.dock import FarslipDock

    plugin_settings()
    manager = BackendManager()
    widget = FarslipDock(qgis_iface, manager)
    yield widget
    widget.close_down()
    widget.deleteLater()


def test_class_lines_are_one_per_line_with_commas_for_synonyms(dock):
    dock.form.classesEdit.setPlainText("building,roof\n\n  road , parking lot  # paved\n# a comment\ntree\n")
    assert dock.class_lines() == ["building, roof", "road, parking lot", "tree"]


def test_choosing_a_preset_fills_the_class_lines(dock, farslip):
    from qgis_farslip.classes import bundled_presets

    presets = bundled_presets()
    assert "urban" in presets
    dock.choose_preset("urban")
    assert dock.class_lines() == presets["urban"]


def test_presets_from_the_backend_replace_the_bundled_ones(dock):
    dock.set_presets({"mine": ["water", "field, crop"]})
    dock.choose_preset("mine")
    assert dock.class_lines() == ["water", "field, crop"]


def test_drawn_extent_in_another_crs_is_transformed_to_the_raster_crs(dock, qgis_new_project):
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    assert layer.crs().authid() == "EPSG:26914"
    # On UTM zone 14's central meridian (99 W) the easting is 500000 m exactly.
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    to_wgs84 = QgsCoordinateTransform(layer.crs(), wgs84, QgsProject.instance())
    centre = to_wgs84.transform(layer.extent().center())
    drawn = QgsRectangle(-99.001, centre.y() - 0.001, -98.999, centre.y() + 0.001)
    if not layer.extent().contains(QgsCoordinateTransform(wgs84, layer.crs(), QgsProject.instance())
                                   .transform(QgsPointXY(-99.0, centre.y()))):
        drawn = QgsRectangle(centre.x() - 0.001, centre.y() - 0.001, centre.x() + 0.001, centre.y() + 0.001)
    dock.set_drawn_extent(drawn, wgs84)
    in_layer = dock.extent_in_layer_crs(layer)
    assert in_layer.center().y() == pytest.approx(layer.extent().center().y(), abs=1.0)
    if drawn.center().x() == pytest.approx(-99.0):
        assert in_layer.center().x() == pytest.approx(500000.0, abs=0.5)
    # 0.002 degrees of latitude are about 222 m; of longitude at this latitude about 150 m.
    assert in_layer.height() == pytest.approx(222.0, rel=0.02)
    assert 100 < in_layer.width() < 200

    dock.form.classesEdit.setPlainText("water\nfield")
    request, prepare = dock.build_request()
    assert prepare is None  # a local GeoTIFF is read by the backend itself
    assert request["raster"] == str(NAIP)
    # Sent in the raster's CRS, clipped to it: the backend reads the rectangle the dock shows.
    assert request["bbox_crs"] == "EPSG:26914"
    assert request["bbox"] == pytest.approx([in_layer.xMinimum(), in_layer.yMinimum(), in_layer.xMaximum(),
                                             in_layer.yMaximum()])
    assert request["class_lines"] == ["water", "field"]
    assert request["out"].endswith(".gpkg")



def test_the_bands_the_layer_shows_are_the_bands_sent_to_the_model(dock, qgis_new_project):
    """An analyst who shows NAIP's near infrared as red (bands 4, 1, 2) or one band in grey has the model
    see those bands; QGIS's own first choice (1, 2, 3 of a colour image, band 1 of a grey one) sends
    none, so the backend reads the bands by their colour interpretation; a channel left unset sends
    none either."""
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.classesEdit.setPlainText("water")
    assert [layer.renderer().redBand(), layer.renderer().greenBand(), layer.renderer().blueBand()] == [1, 2, 3]
    assert "bands" not in dock.build_request()[0]
    provider = layer.dataProvider()
    layer.setRenderer(QgsMultiBandColorRenderer(provider, 4, 1, 2))
    assert dock.build_request()[0]["bands"] == [4, 1, 2]
    layer.setRenderer(QgsMultiBandColorRenderer(provider, 3, -1, 1))
    assert "bands" not in dock.build_request()[0]
    layer.setRenderer(QgsSingleBandGrayRenderer(provider, 4))
    assert dock.build_request()[0]["bands"] == [4]
    layer.setRenderer(QgsSingleBandGrayRenderer(provider, 1))  # one band of a colour image: a choice
    assert dock.build_request()[0]["bands"] == [1]
    layer.setRenderer(QgsPalettedRasterRenderer(provider, 2, []))
    assert dock.build_request()[0]["bands"] == [2]
    grey = QgsRasterLayer(str(NAIP.parent / "solaris_sample_geotiff.tif"), "solaris")
    QgsProject.instance().addMapLayer(grey)
    dock.form.layerCombo.setLayer(grey)
    assert isinstance(grey.renderer(), QgsSingleBandGrayRenderer) and grey.renderer().grayBand() == 1
    assert "bands" not in dock.build_request()[0]


def test_training_and_search_read_the_bands_the_layer_shows_as_segmenting_does(dock, qgis_new_project,
                                                                               backend_home):
    """A model fine-tuned on the colour-infrared view is trained on those bands, and a search indexes
    them (bands are part of an index's key); QGIS's first choice sends none, as for segmenting."""
    from qgis.core import QgsVectorLayer

    layer = QgsRasterLayer(str(NAIP), "naip")
    labels = QgsVectorLayer(str(NAIP.parent / "solaris_geotiff_labels.geojson"), "labels", "ogr")
    assert labels.isValid()
    QgsProject.instance().addMapLayers([layer, labels])
    form = dock.form
    form.trainRasterCombo.setLayer(layer)
    form.labelsCombo.setLayer(labels)
    form.classFieldCombo.setField("building")
    form.modelNameEdit.setText("bands-check")
    dock.search_tab.form.searchRasterCombo.setLayer(layer)
    dock.search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert "bands" not in dock.train_tab.build_request()[0]
    assert "bands" not in dock.search_tab.build_request()[0]
    layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 4, 1, 2))
    assert dock.train_tab.build_request()[0]["bands"] == [4, 1, 2]
    assert dock.search_tab.build_request()[0]["bands"] == [4, 1, 2]

def test_canvas_extent_is_sent_in_the_layer_crs(dock, qgis_iface, qgis_new_project):
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    canvas = qgis_iface.mapCanvas()
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    canvas.setDestinationCrs(mercator)
    in_mercator = QgsCoordinateTransform(layer.crs(), mercator, QgsProject.instance()).transformBoundingBox(
        layer.extent())
    in_mercator.scale(0.5)
    canvas.setExtent(in_mercator)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("canvas"))
    dock.form.classesEdit.setPlainText("water")
    request, _ = dock.build_request()
    assert request["bbox_crs"] == "EPSG:26914"
    sent = QgsRectangle(*request["bbox"])
    assert sent == dock.extent_in_layer_crs(layer)
    assert layer.extent().contains(sent)
    assert dock.extent_in_layer_crs(layer).height() < 0.6 * layer.extent().height()


def test_extent_outside_the_raster_is_refused_with_a_sentence(dock, qgis_new_project):
    from qgis_farslip.dock import UserError

    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.set_drawn_extent(QgsRectangle(10, 10, 11, 11), QgsCoordinateReferenceSystem("EPSG:4326"))
    dock.form.classesEdit.setPlainText("water")
    with pytest.raises(UserError, match="does not overlap the raster naip"):
        dock.build_request()


def test_no_classes_is_refused_with_a_sentence(dock, qgis_new_project):
    from qgis_farslip.dock import UserError

    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.form.classesEdit.setPlainText("  \n# nothing\n")
    with pytest.raises(UserError, match="at least one class"):
        dock.build_request()


def test_settings_dialog_round_trips_through_qgs_settings(farslip, plugin_settings, tmp_path):
    from qgis_farslip.settings import PluginSettings
    from qgis_farslip.settings_dialog import SettingsDialog

    wanted = PluginSettings(backend_command="/opt/farslip/bin/python", backend_url="http://127.0.0.1:8765",
                            backend_token="secret", connection_file="", auto_start=False,
                            default_model="farslip1-vit-b-16", output_folder=str(tmp_path),
                            ray_address="ray://head:10001")
    dialog = SettingsDialog(wanted)
    assert dialog.settings() == wanted
    dialog.settings().save()
    assert PluginSettings.load() == wanted
    dialog.deleteLater()


@pytest.mark.parametrize("typed, where", [("~/farslip-out", "home"), ("relative-out", "project")])
def test_an_output_folder_typed_with_a_tilde_or_relative_is_made_absolute(dock, plugin_settings, qgis_new_project,
                                                                         tmp_path, monkeypatch, typed, where):
    """~ is the home folder, a relative folder lies in the saved project's folder: never a folder named '~' or
    one beside wherever QGIS was started, and never a relative path sent to the backend."""
    home, project_dir, elsewhere = tmp_path / "home", tmp_path / "project", tmp_path / "elsewhere"
    for folder in (home, project_dir, elsewhere):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    QgsProject.instance().setFileName(str(project_dir / "analysis.qgz"))
    plugin_settings(output_folder=typed)
    layer = QgsRasterLayer(str(NAIP), "naip")
    QgsProject.instance().addMapLayer(layer)
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("layer"))
    dock.form.classesEdit.setPlainText("water\nroad")
    out = dock.build_request()[0]["out"]
    expected = (home / "farslip-out") if where == "home" else (project_dir / "relative-out")
    assert out.startswith(str(expected) + "/") and expected.is_dir()
    assert list(elsewhere.iterdir()) == []
