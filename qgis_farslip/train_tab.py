"""The dock's Train tab: fine-tune a model on a polygon layer labelled with classes."""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .backend_manager import log
from .extent import local_raster_path, transform_extent
from .jobs import JobTask
from .settings import PluginSettings

SINGLE_LAYER_FORMATS = (".shp", ".geojson", ".json", ".fgb", ".kml", ".gml")


class UserError(ValueError):
    """Something the user can fix in the Train tab; the message says what."""


def default_models_dir() -> str:
    """Where the backend looks for fine-tuned models (the backend's models_dir(), same environment)."""
    explicit = os.environ.get("FARSLIP_MODELS")
    if explicit:
        return os.path.expanduser(explicit)
    home = os.environ.get("FARSLIP_HOME")
    if not home:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        home = os.path.join(data, "farslip")
    return os.path.join(os.path.expanduser(home), "models")


def labels_file(layer: QgsVectorLayer, class_field: str, folder_maker: Callable[[], str]) -> str:
    """A file the backend can read the labels from: the layer's own file, or a GeoPackage copy of it."""
    if layer.providerType() == "ogr":
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path", "")
        plain = not parts.get("subset") and (not parts.get("layerName")
                                             or path.lower().endswith(SINGLE_LAYER_FORMATS))
        unsaved = layer.isEditable() and layer.isModified()
        if plain and os.path.isfile(path) and not layer.subsetString() and not unsaved:
            return path
    # Memory layers, database tables, filtered or unsaved layers, one layer of a multi-layer GeoPackage: a copy.
    path = os.path.join(folder_maker(), "labels.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.attributes = [layer.fields().indexOf(class_field)]
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, layer.transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise UserError(f"The labels of {layer.name()} could not be written for the backend: {message}")
    return path


def metrics_text(result: dict) -> str:
    """'Validation mIoU: 31.2 % before, 58.9 % after fine-tuning' from a train job's result."""
    metrics = result.get("metrics") or {}
    before, after = (metrics.get("before") or {}).get("miou"), (metrics.get("after") or {}).get("miou")
    if before is None and after is None:
        return ""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"
    return f"Validation mIoU: {percent(before)} before, {percent(after)} after fine-tuning."


class TrainTab(QObject):
    trainFinished = pyqtSignal(str)  # "done", "failed" or "cancelled"

    def __init__(self, dock, settings_loader: Callable[[], PluginSettings] = PluginSettings.load):
        super().__init__(dock)
        self.dock = dock
        self.form = dock.form
        self.settings_loader = settings_loader
        self.task: JobTask | None = None
        self.last_model_dir = ""
        self.last_error = ""
        self._last_message = ""
        self._temporary_dirs: list[str] = []
        self.form.labelsCombo.layerChanged.connect(self.form.classFieldCombo.setLayer)
        self.form.classFieldCombo.setLayer(self.form.labelsCombo.currentLayer())
        self.form.trainButton.clicked.connect(self.train)
        self.form.trainCancelButton.clicked.connect(self.cancel)

    def _temporary_dir(self) -> str:
        folder = tempfile.mkdtemp(prefix="farslip-train-")
        self._temporary_dirs.append(folder)
        return folder

    def build_request(self) -> tuple[dict[str, Any], Callable | None, str]:
        form = self.form
        raster = form.trainRasterCombo.currentLayer()
        if not isinstance(raster, QgsRasterLayer) or not raster.isValid():
            raise UserError("Choose the raster to train on.")
        labels = form.labelsCombo.currentLayer()
        if not isinstance(labels, QgsVectorLayer) or not labels.isValid():
            raise UserError("Choose a polygon layer with labelled areas.")
        class_field = form.classFieldCombo.currentField()
        if not class_field:
            raise UserError(f"Choose the field of {labels.name()} that holds the class names.")
        name = form.modelNameEdit.text().strip() or f"{raster.name()}-{time.strftime('%Y%m%d-%H%M')}"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
        out = os.path.join(default_models_dir(), name)
        if os.path.exists(out):
            raise UserError(f"A model called {name} exists already ({out}); choose another name.")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        request: dict[str, Any] = {
            "labels": labels_file(labels, class_field, self._temporary_dir), "class_field": class_field,
            "out": out, "base_model": self._base_model(), "method": form.methodCombo.currentText(),
            "epochs": int(form.epochsSpin.value()),
            "background": form.backgroundEdit.text().strip() or None}
        prepare = None
        path = local_raster_path(raster)
        if path is not None:
            request["raster"] = path
        else:
            extent = transform_extent(labels.extent(), labels.crs(), raster.crs()).intersect(raster.extent())
            if extent.isEmpty():
                raise UserError(f"The labels of {labels.name()} do not overlap the raster {raster.name()}.")
            prepare = self.dock._local_copy_step(raster, extent)
        return request, prepare, out

    def _base_model(self) -> str | None:
        return self.dock.chosen_model(self.form.baseModelCombo)

    def train(self) -> None:
        if self.task is not None:
            return
        self.last_error = ""
        try:
            request, prepare, out = self.build_request()
        except UserError as error:
            self._show(str(error), error=True)
            self.trainFinished.emit("failed")
            return
        if self.dock.manager.state != "ready" or self.dock.manager.connection is None:
            self._show("The FarSLIP backend is not connected; press Connect below.", error=True)
            self.dock.manager.ensure()
            self.trainFinished.emit("failed")
            return
        self.form.trainLog.clear()
        self._last_message = ""
        task = JobTask(f"FarSLIP: training {os.path.basename(out)}", self.dock.manager.connection, "train",
                       request, prepare)
        task.jobUpdated.connect(self._job_updated)
        task.succeeded.connect(self._job_done)
        task.failedWith.connect(self._job_failed)
        task.cancelledJob.connect(self._job_cancelled)
        self.task = task
        self._set_running(True)
        self.form.trainProgressBar.setValue(0)
        self._show(f"Training {os.path.basename(out)} from {request['base_model'] or 'the default model'} "
                   f"({request['method']}, {request['epochs']} epochs)...")
        QgsApplication.taskManager().addTask(task)

    def cancel(self) -> None:
        if self.task is not None:
            self._show("Cancelling...")
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.form.trainButton.setEnabled(not running)
        self.form.trainCancelButton.setEnabled(running)

    def _show(self, text: str, error: bool = False) -> None:
        if error:
            self.last_error = text
            log(text, Qgis.Warning)
        self.form.trainLog.appendHtml(f"<span style='color:#b00020'>{html.escape(text)}</span>" if error
                                      else html.escape(text))

    def _job_updated(self, job: dict) -> None:
        self.form.trainProgressBar.setValue(round(100 * float(job.get("progress") or 0.0)))
        message = job.get("message") or ""
        if message and message != self._last_message:  # the backend's "epoch 2/5: loss ..., val mIoU ..."
            self._last_message = message
            self._show(message)

    def _finish(self, state: str) -> None:
        self.task = None
        self._set_running(False)
        for folder in self._temporary_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary_dirs = []
        self.trainFinished.emit(state)

    def _job_done(self, job: dict) -> None:
        result = job.get("result") or {}
        self.last_model_dir = (result.get("outputs") or {}).get("model_dir") or job["request"].get("out", "")
        self.form.trainProgressBar.setValue(100)
        summary = metrics_text(result)
        if summary:
            self._show(summary)
        name = os.path.basename(self.last_model_dir.rstrip("/\\"))
        self._show(f"Saved the model {name} in {self.last_model_dir}; it is in the model list of the "
                   "Segment tab.")
        combo = self.form.modelCombo
        if combo.findData(name) < 0:
            combo.addItem(name, name)
        combo.setCurrentIndex(combo.findData(name))
        self.dock.refresh_backend_lists()
        self._finish("done")

    def _job_failed(self, message: str) -> None:
        self._show(message, error=True)
        self._finish("failed")

    def _job_cancelled(self) -> None:
        self.form.trainProgressBar.setValue(0)
        self._show("Cancelled; no model was written.")
        self._finish("cancelled")
