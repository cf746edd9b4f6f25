"""The FarSLIP dock: choose a raster, an extent and class names, run, get a styled polygon layer."""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget
from qgis.PyQt import sip, uic
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QFileDialog, QWidget

from .backend_manager import BackendManager, log
from .classes import bundled_presets, parse_class_text
from .client import BackendClient, Connection, device_text
from .filenames import safe_file_stem
from .extent import crs_text, export_size, local_raster_path, transform_extent, write_geotiff
from .jobs import JobTask, eta_text
from .map_tool import RectangleMapTool
from .results import export_vector_layer, load_segment_result
from .search_tab import SearchTab
from .settings import PluginSettings
from .tasks import run_in_background
from .train_tab import TrainTab

FORM, _ = uic.loadUiType(os.path.join(os.path.dirname(__file__), "ui", "dock.ui"))

EXTENT_CANVAS, EXTENT_LAYER, EXTENT_DRAWN = "canvas", "layer", "drawn"
CUSTOM_PRESET = "Custom classes"


class UserError(ValueError):
    """Something the user can fix in the dock; the message says what."""


def safe_name(text: str) -> str:
    return safe_file_stem(text, fallback="raster")


class FarslipDock(QgsDockWidget):
    jobFinished = pyqtSignal(str)  # "done", "failed" or "cancelled"; for scripts and tests

    def __init__(self, iface, manager: BackendManager, settings_loader: Callable[[], PluginSettings]
                 = PluginSettings.load, parent=None):
        super().__init__("FarSLIP", parent)
        self.setObjectName("FarslipDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.manager = manager
        self.settings_loader = settings_loader
        self.form = FORM()
        self.body = QWidget(self)
        self.form.setupUi(self.body)
        self.setWidget(self.body)

        self.presets: dict[str, list[str]] = {}
        self.task: JobTask | None = None
        self.last_layers: list[Any] = []
        self.last_error = ""
        self.drawn_extent: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None
        self.map_tool = RectangleMapTool(self.canvas)
        self.map_tool.extentDrawn.connect(self._extent_drawn)
        self._pending_run = False
        self._temporary_dirs: list[str] = []

        form = self.form
        form.layerCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        form.trainRasterCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        form.labelsCombo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        form.extentCombo.addItem("Map canvas", EXTENT_CANVAS)
        form.extentCombo.addItem("Whole layer", EXTENT_LAYER)
        form.extentCombo.addItem("Drawn rectangle", EXTENT_DRAWN)
        form.methodCombo.addItems(["lora", "last-blocks", "full"])
        self.set_presets(bundled_presets())

        form.presetCombo.activated.connect(self._preset_chosen)
        form.drawButton.clicked.connect(self.start_drawing)
        form.runButton.clicked.connect(self.run)
        form.cancelButton.clicked.connect(self.cancel)
        form.exportButton.clicked.connect(lambda: self.export_result())
        form.refreshModelsButton.clicked.connect(self.refresh_backend_lists)
        form.connectButton.clicked.connect(self.connect_backend)
        manager.ready.connect(self._backend_ready)
        manager.failed.connect(self._backend_failed)
        manager.stateChanged.connect(self._backend_state)
        QgsProject.instance().layersWillBeRemoved.connect(self._layers_removed)
        self.train_tab = TrainTab(self, settings_loader)
        self.search_tab = SearchTab(self, settings_loader)

    # -- backend ------------------------------------------------------------------------------
    def connect_backend(self) -> None:
        self.manager.ensure()

    def _backend_state(self, state: str) -> None:
        if state == "starting":
            self.form.deviceLabel.setText("Backend: starting...")
        elif state == "idle":
            self.form.deviceLabel.setText("Backend: not connected")

    def _backend_ready(self, connection: Connection, health: dict) -> None:
        self.show_backend_message("")
        self.form.deviceLabel.setText(f"Backend: {device_text(health)}")
        self.form.deviceLabel.setToolTip(f"{connection.url}, FarSLIP {health.get('version', '')}")
        self.refresh_backend_lists()
        if self._pending_run:
            self._pending_run = False
            self.run()

    def _backend_failed(self, message: str) -> None:
        self.form.deviceLabel.setText("Backend: not available")
        self.show_backend_message(message)
        if self._pending_run:
            self._pending_run = False
            self._set_running(False)
            self.form.statusLabel.setText("Not run: the FarSLIP backend is not available.")
            self.jobFinished.emit("failed")

    def show_backend_message(self, rich_text: str) -> None:
        self.form.backendMessage.setText(rich_text)
        self.form.backendMessage.setVisible(bool(rich_text))

    def refresh_backend_lists(self) -> None:
        """Models and presets from the backend (in the background)."""
        if self.manager.connection is None:
            self.manager.ensure()
            return
        client = BackendClient(self.manager.connection, timeout=10)
        run_in_background("Reading FarSLIP models and presets",
                          lambda: (client.models(), client.presets()), self._lists_arrived)

    def _lists_arrived(self, result, error) -> None:
        if error is not None:
            log(f"Could not read models and presets: {error}", Qgis.Warning)
            return
        models, presets = result
        self.set_models(models)
        if presets:
            self.set_presets(presets)

    def set_models(self, models: dict) -> None:
        combo = self.form.modelCombo
        current = combo.currentText()
        combo.clear()
        for model in models.get("models", []):
            label = model["name"]
            if model.get("multilingual"):
                label += " (multilingual)"
            if not model.get("present", True):
                label += " (not downloaded)"
            combo.addItem(label, model["name"])
            combo.setItemData(combo.count() - 1, ", ".join(model.get("languages") or ["en"]), Qt.ToolTipRole)
        wanted = current or self.settings_loader().default_model or models.get("default", "")
        index = combo.findData(wanted)
        if index >= 0:
            combo.setCurrentIndex(index)
        else:
            combo.setEditText(wanted)
        self.form.baseModelCombo.clear()
        for index in range(combo.count()):
            self.form.baseModelCombo.addItem(combo.itemText(index), combo.itemData(index))

    def set_presets(self, presets: dict[str, list[str]]) -> None:
        self.presets = dict(presets)
        combo = self.form.presetCombo
        current = combo.currentText()
        combo.clear()
        combo.addItem(CUSTOM_PRESET)
        combo.addItems(sorted(self.presets))
        combo.setCurrentIndex(max(0, combo.findText(current)))

    def _preset_chosen(self, index: int) -> None:
        name = self.form.presetCombo.itemText(index)
        if name in self.presets:
            self.form.classesEdit.setPlainText("\n".join(self.presets[name]))

    def choose_preset(self, name: str) -> None:
        index = self.form.presetCombo.findText(name)
        if index < 0:
            raise UserError(f"There is no preset called {name!r}.")
        self.form.presetCombo.setCurrentIndex(index)
        self._preset_chosen(index)

    # -- inputs -------------------------------------------------------------------------------
    def class_lines(self) -> list[str]:
        return parse_class_text(self.form.classesEdit.toPlainText())

    def model_name(self) -> str | None:
        return self.chosen_model(self.form.modelCombo)

    def chosen_model(self, combo) -> str | None:
        """The model an editable model combo names (item data, or typed text), else the default model."""
        text = combo.currentText().strip()
        index = combo.findText(text)
        value = combo.itemData(index) if index >= 0 else text
        return value or self.settings_loader().default_model or None

    def start_drawing(self) -> None:
        self.form.extentCombo.setCurrentIndex(self.form.extentCombo.findData(EXTENT_DRAWN))
        self.canvas.setMapTool(self.map_tool)

    def _extent_drawn(self, rectangle: QgsRectangle) -> None:
        self.set_drawn_extent(rectangle, self.canvas.mapSettings().destinationCrs())
        self.canvas.unsetMapTool(self.map_tool)

    def set_drawn_extent(self, rectangle: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> None:
        self.drawn_extent = (QgsRectangle(rectangle), crs)
        self.form.extentCombo.setCurrentIndex(self.form.extentCombo.findData(EXTENT_DRAWN))

    def chosen_extent(self) -> tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None:
        """The extent to segment and its CRS; None means the whole layer."""
        choice = self.form.extentCombo.currentData()
        if choice == EXTENT_LAYER:
            return None
        if choice == EXTENT_DRAWN:
            if self.drawn_extent is None:
                raise UserError("Draw the rectangle to segment on the map first (the Draw button).")
            return self.drawn_extent
        return self.canvas.extent(), self.canvas.mapSettings().destinationCrs()

    def extent_in_layer_crs(self, layer: QgsRasterLayer) -> QgsRectangle:
        """The chosen extent as the raster's CRS sees it, clipped to the raster."""
        chosen = self.chosen_extent()
        if chosen is None:
            return layer.extent()
        rectangle, crs = chosen
        in_layer = transform_extent(rectangle, crs, layer.crs())
        clipped = in_layer.intersect(layer.extent())
        if clipped.isEmpty() or clipped.width() <= 0 or clipped.height() <= 0:
            raise UserError(f"The chosen extent does not overlap the raster {layer.name()}; "
                            "pan the map to the raster or choose 'Whole layer'.")
        return clipped

    def build_request(self) -> tuple[dict[str, Any], Callable | None, list[str]]:
        """The POST /v1/segment body, a preparation step for non-file layers, and the output paths."""
        layer = self.form.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise UserError("Choose a raster layer to segment.")
        class_lines = self.class_lines()
        if not class_lines:
            raise UserError("Type at least one class name (one per line), or choose a preset.")
        in_layer = self.extent_in_layer_crs(layer)
        settings = self.settings_loader()
        folder = settings.output_dir()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"The output folder {folder} cannot be created ({error.strerror}); "
                            "choose another one in the FarSLIP settings.") from None
        stem = os.path.join(folder, f"{safe_name(layer.name())}_{time.strftime('%Y%m%d-%H%M%S')}")
        outputs = {"out": stem + ".gpkg",
                   "class_raster": stem + "_classes.tif" if self.form.classRasterCheck.isChecked() else None,
                   "prob_raster": stem + "_probabilities.tif" if self.form.probRasterCheck.isChecked() else None}
        request: dict[str, Any] = {"class_lines": class_lines, "model": self.model_name(),
                                   "threshold": float(self.form.thresholdSpin.value()), **outputs}
        prepare = None
        path = local_raster_path(layer)
        if path is not None:
            request["raster"] = path
            chosen = self.chosen_extent()
            if chosen is not None:
                rectangle, crs = chosen
                request["bbox"] = [rectangle.xMinimum(), rectangle.yMinimum(),
                                   rectangle.xMaximum(), rectangle.yMaximum()]
                request["bbox_crs"] = crs_text(crs)
        else:
            prepare = self._local_copy_step(layer, in_layer)
        return request, prepare, [p for p in outputs.values() if p]

    def _local_copy_step(self, layer: QgsRasterLayer, extent: QgsRectangle) -> Callable:
        """A step for the job's worker thread: write a WMS/XYZ/virtual layer's extent to a GeoTIFF."""
        canvas_in_layer = transform_extent(self.canvas.extent(), self.canvas.mapSettings().destinationCrs(),
                                           layer.crs())
        size = export_size(layer, extent, canvas_in_layer, (self.canvas.width(), self.canvas.height()))
        provider = layer.dataProvider().clone()  # a provider of its own for the worker thread
        crs = QgsCoordinateReferenceSystem(layer.crs())
        folder = tempfile.mkdtemp(prefix="farslip-")
        self._temporary_dirs.append(folder)
        path = os.path.join(folder, safe_name(layer.name()) + ".tif")

        def write_local_copy(task, request):
            log(f"Writing {layer.name()} ({size[0]} x {size[1]} px) to {path} for the backend.")
            request["raster"] = write_geotiff(provider, extent, size, crs, path)

        return write_local_copy

    # -- running ------------------------------------------------------------------------------
    def _set_running(self, running: bool) -> None:
        self.form.runButton.setEnabled(not running)
        self.form.cancelButton.setEnabled(running)

    def run(self) -> None:
        if self.task is not None:
            return
        self.last_error = ""
        try:
            request, prepare, output_paths = self.build_request()
        except UserError as error:
            self._show_error(str(error))
            self.jobFinished.emit("failed")
            return
        if self.manager.state != "ready" or self.manager.connection is None:
            self._pending_run = True
            self._set_running(True)
            self.form.statusLabel.setText("Connecting to the FarSLIP backend...")
            self.manager.ensure()
            return
        layer = self.form.layerCombo.currentLayer()
        task = JobTask(f"FarSLIP: segmenting {layer.name()}", self.manager.connection, "segment", request,
                       prepare, output_paths)
        task.jobUpdated.connect(self._job_updated)
        task.succeeded.connect(lambda job: self._job_done(job, layer))
        task.failedWith.connect(self._job_failed)
        task.cancelledJob.connect(self._job_cancelled)
        self.task = task
        self._set_running(True)
        self.form.progressBar.setValue(0)
        self.form.statusLabel.setStyleSheet("")
        self.form.statusLabel.setText("Submitting the job...")
        QgsApplication.taskManager().addTask(task)

    def cancel(self) -> None:
        if self.task is not None:
            self.form.statusLabel.setText("Cancelling...")
            self.task.cancel()
        elif self._pending_run:
            self._pending_run = False
            self._set_running(False)
            self.form.statusLabel.setText("Cancelled.")
            self.jobFinished.emit("cancelled")

    def _job_updated(self, job: dict) -> None:
        self.form.progressBar.setValue(round(100 * float(job.get("progress") or 0.0)))
        self.form.statusLabel.setText(eta_text(job))

    def _finish(self, state: str) -> None:
        self.task = None
        self._set_running(False)
        for folder in self._temporary_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary_dirs = []
        self.jobFinished.emit(state)

    def _job_done(self, job: dict, raster_layer: QgsRasterLayer) -> None:
        try:
            self.last_layers = load_segment_result(job, raster_layer, f"FarSLIP {raster_layer.name()}")
        except RuntimeError as error:
            self._show_error(str(error))
            self._finish("failed")
            return
        classes = (job.get("result") or {}).get("classes") or []
        found = [f"{item['class']} ({item['polygons']})" for item in classes if item.get("polygons")]
        self.form.progressBar.setValue(100)
        self.form.statusLabel.setText("Done: " + (", ".join(found) if found else "no polygons found") + ".")
        self.form.exportButton.setEnabled(True)
        self._finish("done")

    def _job_failed(self, message: str) -> None:
        self._show_error(message)
        self._finish("failed")

    def _job_cancelled(self) -> None:
        self.form.progressBar.setValue(0)
        self.form.statusLabel.setStyleSheet("")
        self.form.statusLabel.setText("Cancelled; nothing was written.")
        self._finish("cancelled")

    def _show_error(self, message: str) -> None:
        self.last_error = message
        self.form.statusLabel.setStyleSheet("color: #b00020;")
        self.form.statusLabel.setText(html.escape(message))
        log(message, Qgis.Warning)

    # -- export -------------------------------------------------------------------------------
    def result_layer(self) -> QgsVectorLayer | None:
        """The FarSLIP result to export: the active layer if it is one, else the latest."""
        active = self.iface.activeLayer()
        if isinstance(active, QgsVectorLayer) and active.customProperty("farslip/run_id") is not None:
            return active
        for layer in self.last_layers:
            if isinstance(layer, QgsVectorLayer):
                return layer
        return None

    def export_result(self, path: str | None = None) -> str | None:
        layer = self.result_layer()
        if layer is None:
            self._show_error("There is no FarSLIP result to export yet; run a segmentation first.")
            return None
        if path is None:
            path, chosen_filter = QFileDialog.getSaveFileName(
                self, "Export the FarSLIP result", os.path.join(self.settings_loader().output_dir(),
                                                                safe_name(layer.name()) + ".shp"),
                "ESRI Shapefile (*.shp);;GeoPackage (*.gpkg)")
            if not path:
                return None
            if not os.path.splitext(path)[1]:
                path += ".gpkg" if "gpkg" in chosen_filter else ".shp"
        try:
            export_vector_layer(layer, path)
        except (RuntimeError, ValueError) as error:
            self._show_error(str(error))
            return None
        self.form.statusLabel.setStyleSheet("")
        self.form.statusLabel.setText(f"Exported to {path}.")
        return path

    def _layers_removed(self, layer_ids) -> None:
        self.last_layers = [layer for layer in self.last_layers
                            if not sip.isdeleted(layer) and layer.id() not in layer_ids]
        self.form.exportButton.setEnabled(bool(self.last_layers))

    def close_down(self) -> None:
        """Called by the plugin's unload: cancel a running job, release the map tool."""
        for task in (self.task, self.train_tab.task):
            if task is not None:
                task.cancel()
        self.search_tab.close_down()
        if self.canvas.mapTool() is self.map_tool:
            self.canvas.unsetMapTool(self.map_tool)
        self.map_tool.clear()
        try:
            QgsProject.instance().layersWillBeRemoved.disconnect(self._layers_removed)
        except TypeError:
            pass
