"""Every result is visible: on top of the layer tree in "FarSLIP results", named, see-through, outlined."""

from __future__ import annotations

import json

import pytest
from plugin_helpers import run_dock_job
from qgis.core import QgsProject, QgsRasterLayer, QgsRectangle, QgsSingleBandPseudoColorRenderer, QgsVectorLayer


@pytest.fixture
def dock(naip_dock):
    return naip_dock


def layer_order():
    return [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]


def test_result_names_say_what_was_asked_for_and_when(farslip):
    from qgis_farslip.results import result_name

    assert result_name("landcover", ["water", "tree"], "14:05:31") == "landcover 14:05:31"
    assert result_name(None, ["water", "grass", "road"], "14:05:31") == "water, grass, road 14:05:31"
    assert result_name(None, ["a", "b", "c", "d", "e"], "09:00:00") == "a, b, c +2 09:00:00"


def test_a_rerun_lands_on_top_of_the_older_result_with_its_own_name_and_exports_styled(dock, naip_layer,
                                                                                        tmp_path):
    dock.choose_preset("water-bodies")
    assert run_dock_job(dock) == "done", dock.last_error
    first = dock.last_layers[0]
    dock.form.classesEdit.setPlainText("tree\nfield, crop\nbare soil")
    assert dock.form.presetCombo.currentIndex() == 0, "an edited class list no longer names the preset"
    assert run_dock_job(dock) == "done", dock.last_error
    second = dock.last_layers[0]

    group = QgsProject.instance().layerTreeRoot().findGroup("FarSLIP results")
    assert group is not None
    assert QgsProject.instance().layerTreeRoot().children()[0] is group, "the results group is the top node"
    assert [node.layer() for node in group.findLayers()][:2] == [second, first]
    order = layer_order()
    assert order.index(second) < order.index(first) < order.index(naip_layer)
    assert first.name().startswith("water-bodies ") and second.name().startswith("tree, field, bare soil ")
    assert first.name() != second.name()

    categories = second.renderer().categories()  # keep the copies alive while their symbols are read
    symbol = categories[0].symbol()
    assert 0 < symbol.color().alpha() < 255, "the fill lets the imagery show through"
    outline = symbol.symbolLayer(0)
    assert outline.strokeColor().alpha() == 255 and outline.strokeWidth() >= 0.3

    # Export: the latest result by default, with its style, offered back to the project.
    shapefile = tmp_path / "export" / "latest.shp"
    assert dock.export_result(str(shapefile)) == str(shapefile), dock.last_error
    assert second.name() in dock.form.statusLabel.text()
    assert (tmp_path / "export" / "latest.qml").is_file(), "a shapefile gets its style as a .qml beside it"
    reopened = QgsVectorLayer(str(shapefile), "again", "ogr")
    assert reopened.featureCount() == second.featureCount()
    assert reopened.renderer().type() == "categorizedSymbol", "QGIS applies the .qml when it opens the file"
    geopackage = tmp_path / "export" / "first.gpkg"
    assert dock.export_result(str(geopackage), first) == str(geopackage)
    from_gpkg = QgsVectorLayer(str(geopackage), "gpkg", "ogr")
    assert from_gpkg.featureCount() == first.featureCount()
    assert from_gpkg.renderer().type() == "categorizedSymbol", "the style is stored in the GeoPackage"
    assert [layer.name() for layer in QgsProject.instance().mapLayersByName("latest")] == ["latest"]


def test_probability_raster_shows_one_class_band_as_a_pseudocolour_ramp(dock):
    from qgis_farslip.results import style_probability_layer

    dock.form.classesEdit.setPlainText("water\ngrass\nroad")
    dock.form.probRasterCheck.setChecked(True)
    assert run_dock_job(dock) == "done", dock.last_error
    vector, probabilities = dock.last_layers[0], dock.last_layers[1]
    assert isinstance(vector, QgsVectorLayer) and isinstance(probabilities, QgsRasterLayer)
    assert layer_order()[:2] == [vector, probabilities]
    assert probabilities.bandCount() == 3
    assert [probabilities.bandName(band) for band in (1, 2, 3)] == [
        "Band 1: water", "Band 2: grass", "Band 3: road"]
    renderer = probabilities.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer) and renderer.band() == 1
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0.0, 1.0)

    assert [dock.form.probClassCombo.itemText(i) for i in range(dock.form.probClassCombo.count())] == [
        "water", "grass", "road"]
    dock.form.probClassCombo.setCurrentText("road")
    assert probabilities.renderer().band() == 3
    with pytest.raises(ValueError, match="not one of the classes"):
        style_probability_layer(probabilities, "forest", [("water", 1)])


def test_processing_takes_a_preset_and_the_default_model_from_the_settings(running_plugin, plugin_settings,
                                                                          qgis_processing, naip_layer,
                                                                          tiny_model, tmp_path):
    import processing
    from qgis.core import QgsApplication
    from qgis_farslip.classes import bundled_presets

    plugin_settings(default_model=str(tiny_model))
    algorithm = QgsApplication.processingRegistry().algorithmById("farslip:segment_by_class_names")
    options = algorithm.parameterDefinition("PRESET").options()
    preset = options.index("water-bodies")
    extent = naip_layer.extent()
    extent.scale(0.4)
    out = tmp_path / "preset.gpkg"
    processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "EXTENT": extent, "PRESET": preset, "CLASSES": "", "MODEL": "",
        "THRESHOLD": 0.0, "OUTPUT": str(out)})
    layer = QgsVectorLayer(str(out), "preset", "ogr")
    assert layer.isValid()
    wanted = {line.split(",")[0].strip() for line in bundled_presets()["water-bodies"]}
    assert {feature["class"] for feature in layer.getFeatures()} <= wanted
    assert QgsApplication.processingRegistry().algorithmById("farslip:train_on_labelled_polygons") is not None


def test_processing_evaluates_a_model_on_labelled_polygons(running_plugin, qgis_processing, naip_layer,
                                                           tiny_model, tmp_path):
    import processing
    from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsRectangle
    from qgis.PyQt.QtCore import QVariant

    labels = QgsVectorLayer(f"Polygon?crs={naip_layer.crs().authid()}", "labels", "memory")
    labels.dataProvider().addAttributes([QgsField("cls", QVariant.String)])
    labels.updateFields()
    extent = naip_layer.extent()
    half = extent.width() / 4
    for index, name in enumerate(("water", "field")):
        feature = QgsFeature(labels.fields())
        left = extent.xMinimum() + index * half
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(left, extent.yMinimum(), left + half,
                                                              extent.yMinimum() + half)))
        feature["cls"] = name
        labels.dataProvider().addFeature(feature)
    out = tmp_path / "evaluation.json"
    result = processing.run("farslip:evaluate_on_labelled_polygons", {
        "INPUT": naip_layer, "LABELS": labels, "CLASS_FIELD": "cls", "MODEL": str(tiny_model),
        "BACKGROUND": "", "OUTPUT": str(out)})
    report = json.loads(out.read_text())
    assert {item["class"] for item in report["metrics"]["classes"]} == {"water", "field"}
    assert result["MIOU"] == pytest.approx(report["metrics"]["miou"])
    assert 0.0 <= result["MIOU"] <= 1.0

    # Run again to the same report (QGIS's file dialog asked before replacing it): the report is replaced.
    out.write_text("the previous report")
    again = processing.run("farslip:evaluate_on_labelled_polygons", {
        "INPUT": naip_layer, "LABELS": labels, "CLASS_FIELD": "cls", "MODEL": str(tiny_model),
        "BACKGROUND": "", "OUTPUT": str(out)})
    assert json.loads(out.read_text())["metrics"]["miou"] == pytest.approx(again["MIOU"])


def test_processing_searches_a_raster_by_sentences(running_plugin, qgis_processing, naip_layer, tiny_model,
                                                   tmp_path):
    import processing

    out = tmp_path / "places.gpkg"
    extent = naip_layer.extent()
    extent.scale(0.5)
    processing.run("farslip:search_by_sentences", {
        "INPUT": naip_layer, "SENTENCES": "a lake\nfarmland", "TOP": 5, "MODEL": str(tiny_model),
        "EXTENT": extent, "OUTPUT": str(out)})
    places = QgsVectorLayer(str(out), "places", "ogr")
    assert places.isValid() and 0 < places.featureCount() <= 2 * 5  # at most TOP places per sentence
    assert "score" in places.fields().names()
    # An extent reaching far beyond the raster (here 3x its size) means the part on it, as Segment takes it.
    wide = naip_layer.extent()
    wide.scale(3.0)
    everywhere = tmp_path / "everywhere.gpkg"
    processing.run("farslip:search_by_sentences", {
        "INPUT": naip_layer, "SENTENCES": "a lake", "TOP": 3, "MODEL": str(tiny_model), "EXTENT": wide,
        "OUTPUT": str(everywhere)})
    report = json.loads(everywhere.with_suffix(".report.json").read_text())
    assert report["bbox_crs"] == naip_layer.crs().authid()
    assert QgsRectangle(*report["bbox"]) == naip_layer.extent(), report["bbox"]

def test_removing_the_raster_mid_run_still_loads_the_result(dock, naip_layer):
    from qgis.core import QgsRasterLayer as Raster

    copy = Raster(naip_layer.source(), "naip copy")
    QgsProject.instance().addMapLayer(copy)
    dock.form.layerCombo.setLayer(copy)
    states = []
    dock.jobFinished.connect(states.append)
    dock.run()
    QgsProject.instance().removeMapLayer(copy.id())  # the user deletes the raster while it runs
    from plugin_helpers import wait_until

    wait_until(lambda: states, 180, "the job to finish")
    assert states == ["done"], dock.last_error
    assert dock.last_layers[0].isValid() and "deleted" not in dock.form.statusLabel.text()


def test_a_backend_crash_mid_job_says_so_and_restart_brings_it_back(dock, running_plugin):
    """Last in this module: it kills the module's backend (the restart starts a new one)."""
    from plugin_helpers import wait_until

    states, updates = [], []
    dock.jobFinished.connect(states.append)
    dock.form.classesEdit.setPlainText("water\ngrass")
    dock.run()
    dock.runner.task.jobUpdated.connect(updates.append)
    wait_until(lambda: updates or states, 60, "the job to be submitted")
    running_plugin.manager.process.kill()
    wait_until(lambda: states, 60, "the job to fail")
    assert states == ["failed"]
    text = dock.form.statusLabel.text()
    assert "stopped while the job was running" in text and "Errno" not in text
    assert "farslip:restart" in dock.form.statusMessage.text() and dock.form.statusMessage.isVisibleTo(dock)
    assert dock.form.progressBar.value() == 0
    dock.do_action("farslip:restart")
    wait_until(lambda: running_plugin.manager.state == "ready", 150, "the restarted backend")
    assert running_plugin.manager.owns_process()

