"""The plugin starts the real backend, segments a shared raster from the dock, and loads the result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from plugin_helpers import REPO, RecordingFeedback, empty_dir, run_dock_job, wait_until
from qgis.core import (
    NULL,
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMultiBandColorRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

CLASS_TEXT = "water, lake\ngrass, meadow\nroad"
CLASSES = ["water", "grass", "road"]


def configure_dock(dock, layer, tiny_model, extent="layer"):
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData(extent))
    dock.form.classesEdit.setPlainText(CLASS_TEXT)
    dock.form.modelCombo.setEditText(str(tiny_model))
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)


@pytest.fixture
def dock(running_plugin, plugin_settings, naip_layer, tiny_model):
    plugin_settings()
    dock = running_plugin.create_dock()
    configure_dock(dock, naip_layer, tiny_model)
    return dock


def test_backend_started_by_the_plugin_reports_its_device(running_plugin):
    assert running_plugin.manager.owns_process()
    assert running_plugin.manager.health["status"] == "ok"
    assert running_plugin.dock.form.deviceLabel.text().startswith("Backend: ")
    assert "CPU" in running_plugin.dock.form.deviceLabel.text().upper()
    assert not running_plugin.dock.form.backendMessage.isVisible()
    # The backend's own output goes to the FarSLIP tab of the log panel.
    assert any(line.startswith("Starting the FarSLIP backend") for line in running_plugin.test_log)
    assert any("Connection file" in line or "http://127.0.0.1:" in line for line in running_plugin.test_log)


def test_segmenting_from_the_dock_loads_a_styled_layer_above_the_raster(dock, naip_layer, tmp_path,
                                                                        qgis_iface):
    # The canvas shows the raster in another CRS: the extent goes to the backend in the raster's CRS.
    canvas = qgis_iface.mapCanvas()
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    canvas.setDestinationCrs(mercator)
    view = QgsCoordinateTransform(naip_layer.crs(), mercator, QgsProject.instance()).transformBoundingBox(
        naip_layer.extent())
    view.scale(0.6)
    canvas.setExtent(view)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("canvas"))
    dock.form.classRasterCheck.setChecked(True)

    assert run_dock_job(dock) == "done", dock.last_error
    vector = dock.last_layers[0]
    assert isinstance(vector, QgsVectorLayer) and vector.isValid()
    assert vector.crs() == naip_layer.crs()
    assert vector.featureCount() > 0
    assert {"class", "class_id", "score_mean", "score_max", "area_m2"} <= set(vector.fields().names())
    renderer = vector.renderer()
    assert isinstance(renderer, QgsCategorizedSymbolRenderer)
    assert renderer.classAttribute() == "class"
    assert [category.label() for category in renderer.categories()] == CLASSES
    colours = {category.symbol().color().name() for category in renderer.categories()}
    assert len(colours) == len(CLASSES)
    assert dock.form.progressBar.value() == 100
    # The run's estimated mIoU (no labels used) is on the Review tab.
    assert dock.review_tab.form.estimateLabel.text().startswith("Estimated mIoU of this run (no labels used): ")

    class_raster = [layer for layer in dock.last_layers if isinstance(layer, QgsRasterLayer)]
    assert len(class_raster) == 1 and class_raster[0].isValid()
    order = [node.layer() for node in QgsProject.instance().layerTreeRoot().findLayers()]
    assert order.index(vector) < order.index(class_raster[0]) < order.index(naip_layer)
    # One colour rule (resources/palette.json): the backend's colour table is the plugin's style.
    table = {int(item.value): item.color.name() for item in class_raster[0].dataProvider().colorTable(1)}
    assert [table[i] for i in range(len(CLASSES))] == [category.symbol().color().name()
                                                       for category in renderer.categories()]

    shapefile = dock.export_result(str(tmp_path / "export" / "result.shp"))
    assert shapefile is not None, dock.last_error
    exported = QgsVectorLayer(shapefile, "exported", "ogr")
    assert exported.isValid()
    assert exported.featureCount() == vector.featureCount()
    assert exported.crs() == naip_layer.crs()
    geopackage = dock.export_result(str(tmp_path / "export" / "result.gpkg"))
    assert QgsVectorLayer(geopackage, "gpkg", "ogr").featureCount() == vector.featureCount()


def test_a_second_run_with_other_classes_says_features_cached(dock):
    assert run_dock_job(dock) == "done", dock.last_error
    dock.form.classesEdit.setPlainText("forest, trees\nbuilding")
    assert run_dock_job(dock) == "done", dock.last_error
    assert dock.form.statusLabel.text().endswith("; features cached.")


def test_the_backends_warnings_are_said_under_the_result(dock):
    """One class alone gets every pixel: the backend says so in the job's result, and the dock showed only
    'Done: water (1).'"""
    dock.form.classesEdit.setPlainText("water")
    assert run_dock_job(dock) == "done", dock.last_error
    lines = dock.form.statusLabel.text().splitlines()
    assert lines[0].startswith("Done: water")
    assert lines[1:] == ["Warning: Only one class ('water'): the classes compete for each pixel, so a class alone "
                         "gets every pixel with probability 1. Add the classes it should be told apart from (e.g. "
                         "what surrounds it, or 'background')."]
    dock.form.classesEdit.setPlainText("water\nforest, trees")
    assert run_dock_job(dock) == "done", dock.last_error
    assert len(dock.form.statusLabel.text().splitlines()) == 1


def test_without_region_checks_a_re_run_uses_cached_features_and_no_polygon_has_a_region_agreement(dock):
    """The dock's option for quick re-runs with other classes: with region checks (the default) the
    largest polygons get a region agreement; without them the request says so, no polygon gets one,
    and the re-run on the same extent reuses the image features of the first run."""
    assert "region_checks" not in dock.build_request()[0]
    assert run_dock_job(dock) == "done", dock.last_error
    assert any(feature["region_agr"] not in (None, NULL) for feature in dock.last_layers[0].getFeatures())
    dock.form.regionChecksCheck.setChecked(False)
    dock.form.classesEdit.setPlainText("forest, trees\nbuilding")
    assert dock.build_request()[0]["region_checks"] is False
    assert run_dock_job(dock) == "done", dock.last_error
    polygons = dock.last_layers[0]
    assert polygons.featureCount() > 0
    assert all(feature["region_agr"] in (None, NULL) for feature in polygons.getFeatures())
    assert dock.form.statusLabel.text().endswith("; features cached.")



def test_the_model_reads_the_bands_the_layer_shows(dock, naip_layer):
    """Shown as colour infrared (near infrared as red: bands 4, 1, 2), the run reads those bands, as
    its report says, and its classes differ from those of the true-colour run."""
    assert run_dock_job(dock) == "done", dock.last_error
    true_colour = dock.last_layers[0]
    naip_layer.setRenderer(QgsMultiBandColorRenderer(naip_layer.dataProvider(), 4, 1, 2))
    assert run_dock_job(dock) == "done", dock.last_error
    infrared = dock.last_layers[0]
    reports = [json.loads(Path(layer.source().split("|")[0]).with_suffix(".report.json").read_text("utf-8"))
               for layer in (true_colour, infrared)]
    assert reports[0]["bands"] == [1, 2, 3] and reports[1]["bands"] == [4, 1, 2]
    assert reports[1]["options"]["bands"] == [4, 1, 2]
    summary = [sorted((f["class"], round(f["area_m2"], 3)) for f in layer.getFeatures())
               for layer in (true_colour, infrared)]
    assert summary[0] != summary[1]

def test_a_layer_that_is_not_a_local_file_is_copied_to_a_geotiff_first(dock, naip_layer):
    # A virtual raster (QGIS raster calculator provider) has no file the backend could open.
    extent = naip_layer.extent()
    uri = (f"?crs={naip_layer.crs().authid()}&extent={extent.xMinimum()},{extent.yMinimum()},"
           f"{extent.xMaximum()},{extent.yMaximum()}&width=467&height=362&formula=%22naip@1%22"
           f"&naip:uri={naip_layer.source()}&naip:provider=gdal")
    virtual = QgsRasterLayer(uri, "virtual naip", "virtualraster")
    assert virtual.isValid() and virtual.providerType() == "virtualraster"
    QgsProject.instance().addMapLayer(virtual)
    dock.form.layerCombo.setLayer(virtual)
    _request, prepare = dock.build_request()
    assert prepare is not None, "a non-file layer must be written to a temporary GeoTIFF first"

    assert run_dock_job(dock) == "done", dock.last_error
    vector = dock.last_layers[0]
    assert vector.isValid() and vector.featureCount() > 0
    assert vector.crs() == naip_layer.crs()
    # The polygons lie on the virtual layer's area.
    assert extent.buffered(1.0).contains(vector.extent())


def test_cancel_leaves_no_layer_and_no_file(dock, tmp_path):
    """A cancel while the job runs: nothing is loaded or written. (On NAIP itself the tiny model could finish
    before the cancel reached it; a finished job's results are kept, so the raster is enlarged 3x, tens of
    seconds of work.)"""
    from osgeo import gdal
    from plugin_helpers import NAIP, added

    big = str(tmp_path / "big.tif")
    source = gdal.Open(str(NAIP))
    assert gdal.Translate(big, source, width=source.RasterXSize * 3, height=source.RasterYSize * 3) is not None
    layer = added(big, "big")
    dock.form.layerCombo.setLayer(layer)
    dock.form.probRasterCheck.setChecked(True)
    layers_before = set(QgsProject.instance().mapLayers())
    states, updates = [], []
    dock.jobFinished.connect(states.append)
    dock.run()
    dock.runner.task.jobUpdated.connect(updates.append)
    wait_until(lambda: updates or states, 60, "the job to be submitted")
    dock.cancel()
    wait_until(lambda: states, 90, "the job to be cancelled")
    assert states == ["cancelled"]
    assert set(QgsProject.instance().mapLayers()) == layers_before
    assert empty_dir(tmp_path / "results"), list((tmp_path / "results").iterdir())
    assert dock.form.runButton.isEnabled() and not dock.form.cancelButton.isEnabled()
    QgsProject.instance().removeMapLayer(layer.id())


def test_processing_algorithm_runs_through_processing_run(running_plugin, qgis_processing, naip_layer,
                                                          tiny_model, tmp_path):
    import processing

    out = tmp_path / "processing.gpkg"
    extent = naip_layer.extent()
    extent.scale(0.5)
    result = processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "EXTENT": extent, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model),
        "THRESHOLD": 0.0, "OUTPUT": str(out)})
    assert result["OUTPUT"] == f"{out}|layername=processing"  # the written layer, whatever else the file holds
    layer = QgsVectorLayer(result["OUTPUT"], "processing", "ogr")
    assert layer.isValid() and layer.featureCount() > 0
    assert layer.crs() == naip_layer.crs()
    assert layer.extent().width() <= extent.width() + 10
    assert any(feature["region_agr"] not in (None, NULL) for feature in layer.getFeatures())
    quick = tmp_path / "quick.gpkg"
    processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "EXTENT": extent, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model),
        "REGION_CHECKS": False, "OUTPUT": str(quick)})
    quick_layer = QgsVectorLayer(str(quick), "quick", "ogr")
    assert quick_layer.featureCount() == layer.featureCount()
    assert all(feature["region_agr"] in (None, NULL) for feature in quick_layer.getFeatures())
    # The algorithm, like the dock, has the model read the bands the layer shows.
    naip_layer.setRenderer(QgsMultiBandColorRenderer(naip_layer.dataProvider(), 4, 1, 2))
    infrared = tmp_path / "infrared.gpkg"
    processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "EXTENT": extent, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model),
        "REGION_CHECKS": False, "OUTPUT": str(infrared)})
    assert json.loads(infrared.with_suffix(".report.json").read_text("utf-8"))["bands"] == [4, 1, 2]
    assert json.loads(quick.with_suffix(".report.json").read_text("utf-8"))["bands"] == [1, 2, 3]
    # The backend's warnings reach the Processing log as warnings.
    feedback = RecordingFeedback()
    processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "EXTENT": extent, "CLASSES": "water", "MODEL": str(tiny_model),
        "REGION_CHECKS": False, "OUTPUT": str(tmp_path / "alone.gpkg")}, feedback=feedback)
    assert [w for w in feedback.warnings if w.startswith("Only one class ('water')")], feedback.warnings


def test_missing_backend_gives_the_install_message_not_a_traceback(farslip, qgis_iface, plugin_settings,
                                                                   naip_layer, tmp_path, monkeypatch):
    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.dock import FarslipDock

    monkeypatch.setenv("FARSLIP_HOME", str(tmp_path / "nobody-home"))
    plugin_settings(backend_command=str(tmp_path / "no-such-dir" / "farslip"))
    manager = BackendManager(connection_file=str(tmp_path / "backend.json"))
    dock = FarslipDock(qgis_iface, manager)
    dock.form.layerCombo.setLayer(naip_layer)
    dock.form.classesEdit.setPlainText("water")
    try:
        assert run_dock_job(dock, timeout=30) == "failed"
        assert manager.state == "failed"
        message = dock.form.backendMessage.text()
        assert dock.form.backendMessage.isVisibleTo(dock)
        assert "backend was not found" in message
        assert "pip install" in message and "farslip serve" in message
        assert "Traceback" not in message and "Error" not in message
        assert dock.form.runButton.isEnabled()
        assert empty_dir(tmp_path / "results")
    finally:
        dock.close_down()
        manager.stop()


def test_screenshot_of_the_dock_with_a_result_on_the_canvas(dock, naip_layer, qgis_iface):
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtCore import QSize, Qt
    from qgis.PyQt.QtWidgets import QMainWindow

    dock.form.classesEdit.setPlainText("water, lake\ncropland, field\ngrassland\nroad")
    assert run_dock_job(dock) == "done", dock.last_error
    vector = dock.last_layers[0]
    vector.setOpacity(0.6)

    window = QMainWindow()
    window.setWindowTitle("FarSLIP for QGIS")
    canvas = QgsMapCanvas(window)
    canvas.setDestinationCrs(naip_layer.crs())
    canvas.setLayers([vector, naip_layer])
    canvas.setExtent(naip_layer.extent())
    window.setCentralWidget(canvas)
    parent = dock.parent()
    window.addDockWidget(Qt.RightDockWidgetArea, dock)
    window.resize(QSize(1200, 720))
    window.show()
    rendered = []
    canvas.mapCanvasRefreshed.connect(lambda: rendered.append(True))
    canvas.refresh()
    wait_until(lambda: rendered, 30, "the canvas to render")
    # Into the ignored build folder: `make screenshot` copies it to docs/ when the README picture should change.
    out = REPO / "build" / "screenshot.png"
    out.parent.mkdir(exist_ok=True)
    assert window.grab().save(str(out))
    assert out.stat().st_size > 10000
    window.removeDockWidget(dock)
    dock.setParent(parent)
    window.close()
    os.sync()


def test_train_tab_fine_tunes_on_labelled_polygons_and_lists_the_new_model(running_plugin, plugin_settings,
                                                                          tiny_model, qgis_new_project,
                                                                          backend_home):
    dock = running_plugin.create_dock()
    data = REPO / ".." / "shared" / "data"
    raster = QgsRasterLayer(str((data / "solaris_sample_geotiff.tif").resolve()), "solaris")
    labels = QgsVectorLayer(str((data / "solaris_geotiff_labels.geojson").resolve()), "buildings", "ogr")
    assert raster.isValid() and labels.isValid()
    QgsProject.instance().addMapLayers([raster, labels])
    # A constant class field: every labelled polygon is a building, the rest is background.
    labels.startEditing()
    from qgis.core import QgsField
    from qgis.PyQt.QtCore import QVariant

    labels.addAttribute(QgsField("cls", QVariant.String))
    labels.updateFields()
    index = labels.fields().indexOf("cls")
    for feature in labels.getFeatures():
        labels.changeAttributeValue(feature.id(), index, "building")
    # Left in edit mode on purpose: the plugin hands edited layers to the backend as a GeoPackage copy.
    form = dock.form
    form.trainRasterCombo.setLayer(raster)
    form.labelsCombo.setLayer(labels)
    form.classFieldCombo.setField("cls")
    form.backgroundEdit.setText("background")
    form.baseModelCombo.setEditText(str(tiny_model))
    form.methodCombo.setCurrentText("last-blocks")
    form.epochsSpin.setValue(1)
    form.modelNameEdit.setText("solaris-buildings")

    states = []
    dock.train_tab.trainFinished.connect(states.append)
    dock.train_tab.train()
    wait_until(lambda: states, 300, "training to finish")
    labels.rollBack()
    assert states == ["done"], dock.train_tab.last_error
    model_dir = Path(dock.train_tab.last_model_dir)
    assert model_dir.name == "solaris-buildings"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "farslip_model.json").is_file()
    assert "mIoU" in form.trainLog.toPlainText()
    wait_until(lambda: form.modelCombo.findData("solaris-buildings") >= 0, 30, "the model list to refresh")


def test_a_running_backend_is_reused_not_started_twice(running_plugin, qgis_iface):
    from qgis_farslip.backend_manager import BackendManager

    other = BackendManager(connection_file=running_plugin.manager.connection_file)
    try:
        other.ensure()
        wait_until(lambda: other.state in ("ready", "failed"), 30, "the second manager")
        assert other.state == "ready"
        assert other.connection.url == running_plugin.manager.connection.url
        assert not other.owns_process()
    finally:
        other.stop()  # stops nothing: the backend belongs to the first manager
    assert running_plugin.manager.owns_process()

