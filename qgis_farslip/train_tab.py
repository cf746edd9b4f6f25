"""The dock's Train tab: fine-tune a model on a polygon layer labelled with classes."""

from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

from qgis.core import (
    NULL,
    Qgis,
    QgsFeatureRequest,
    QgsMapLayerProxyModel,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRectangle,
    QgsFields,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from osgeo import gdal
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QCheckBox

from .backend_manager import log
from .filenames import safe_file_stem
from .extent import crs_overridden, displayed_bands, local_raster_path, unusable_layer_text
from .extent_choice import ExtentError, clipped_to_layer
from .job_runner import JobRunner
from .jobs import CANCEL_TOO_LATE, eta_text
from .settings import PluginSettings, backend_home, plugin_cache_dir
from .i18n import tr

SINGLE_LAYER_FORMATS = (".shp", ".geojson", ".json", ".fgb", ".kml", ".gml")
WARNING_PREFIX = "Warning: "  # how the backend's train job sends a warning as its message


class UserError(ValueError):
    """Something the user can fix in the Train tab; the message says what."""


def default_models_dir() -> str:
    """Where the backend looks for fine-tuned models (the backend's models_dir(), same environment)."""
    explicit = os.environ.get("FARSLIP_MODELS")
    if explicit:
        return os.path.expanduser(explicit)
    return os.path.join(backend_home(), "models")


def model_folder_name(typed: str, raster_name: str) -> str:
    """The new model's folder name: the typed name in any script (made safe as file names are), else the
    raster's name and the time; never empty (that would name the models folder itself)."""
    stamp = time.strftime("%Y%m%d-%H%M")
    return (safe_file_stem(typed.strip(), fallback="") or safe_file_stem(f"{raster_name}-{stamp}", fallback="")
            or f"model-{stamp}")


def class_field_name(layer: QgsVectorLayer, class_field: str) -> str:
    """The name of the labels' class field `class_field` as the layer spells it: the field itself, else the one
    field whose name differs only in case (as QGIS looks fields up); UserError naming the layer's fields where
    there is none (a misspelled field, or a field of another layer, in a script or a model)."""
    names = layer.fields().names()
    if class_field in names:
        return class_field
    same = [name for name in names if name.lower() == class_field.strip().lower()]
    if len(same) == 1:
        return same[0]
    raise UserError(tr("The labels layer {} has no field '{}'; its fields are: {}.").format(
        layer.name(), class_field, ", ".join(names) or tr("none")))


def kept_labels_dir() -> str:
    """Where the copies of labels layers are kept between runs (`labels_file(..., kept=True)`)."""
    return os.path.join(plugin_cache_dir(), "labels")


def labels_digest(layer: QgsVectorLayer, index: int, selected_only: bool) -> str:
    """A sha256 of what a copy of the labels holds: the CRS, the class field, each polygon and its class."""
    digest = hashlib.sha256()

    def add(data: bytes) -> None:
        digest.update(b"%d:" % len(data) + data)

    add(layer.crs().toWkt().encode("utf-8"))
    add(layer.fields().at(index).name().encode("utf-8"))
    request = QgsFeatureRequest().setSubsetOfAttributes([index])
    for feature in layer.getSelectedFeatures(request) if selected_only else layer.getFeatures(request):
        value = feature.attribute(index)
        add(b"\0" if value is None or value == NULL else str(value).encode("utf-8"))
        add(bytes(feature.geometry().asWkb()))
    return digest.hexdigest()


KEPT_LABELS_DAYS = 90
KEPT_COPY_DATE = "2000-01-01T00:00:00.000Z"
# labels_file's kept names: a stem, '-', 20 hex digits of labels_digest (and SQLite's -wal/-shm beside them).
KEPT_LABELS_NAME = re.compile(r".+-[0-9a-f]{20}\.gpkg(-wal|-shm)?")


def prune_kept_labels(folder: str, days: float = KEPT_LABELS_DAYS) -> None:
    """Remove the kept labels copies (and drafts a crash left) that no run used for `days` days. Nothing is lost:
    a copy is remade, byte for byte, from the same labels (labels_file writes it with a fixed timestamp), so an
    evaluation still knows them."""
    cutoff = time.time() - days * 86400
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            if entry.is_dir(follow_symlinks=False) and entry.name.startswith(".draft-"):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.is_file(follow_symlinks=False) and KEPT_LABELS_NAME.fullmatch(entry.name):
                os.remove(entry.path)
        except OSError:
            pass  # in use elsewhere, or removed meanwhile: left for the next time


def labels_file(layer: QgsVectorLayer, class_field: str, folder_maker: Callable[[], str],
                selected_only: bool = False, kept: bool = False) -> str:
    """A file the backend can read the labels from: the layer's own file, or a GeoPackage copy of it (of its
    selected features only, with `selected_only`). `class_field` is a field of the layer (class_field_name).

    With `kept`, the copy is named after what it holds (labels_digest) and kept: the same labels give the same
    file, bytes and sha256 on every run, as a model fine-tuned on them records them (farslip_model.json), so
    an evaluation of that model on the same labels knows them and scores its held-out strip.

    The copy is written in the layer's CRS, so a CRS the analyst set in QGIS (Layer > Set CRS) on a file
    without one, or with another, is the CRS the backend places the labels in."""
    fields = layer.fields()
    index = fields.indexOf(class_field_name(layer, class_field))
    # A virtual (expression) or joined field is QGIS's, not the file's: the backend reading the file lacks it.
    own_field = fields.fieldOrigin(index) == QgsFields.FieldOrigin.OriginProvider
    if layer.providerType() == "ogr" and not crs_overridden(layer) and not selected_only and own_field:
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path", "")
        plain = not parts.get("subset") and (not parts.get("layerName")
                                             or path.lower().endswith(SINGLE_LAYER_FORMATS))
        unsaved = layer.isEditable() and layer.isModified()
        if plain and os.path.isfile(path) and not layer.subsetString() and not unsaved:
            return path
    # Memory layers, database tables, filtered or unsaved layers, one layer of a multi-layer GeoPackage, a layer
    # whose CRS QGIS overrides, the selected features of a layer, a class field QGIS adds: a copy.
    folder = folder_maker()
    stem = "labels"
    if kept:
        digest = labels_digest(layer, index, selected_only)[:20]
        stem = f"{safe_file_stem(layer.name(), fallback='labels')[:40]}-{digest}"
        copied = os.path.join(folder, stem + ".gpkg")
        try:
            os.utime(copied)  # these labels, copied before and in use again: kept for another while
        except OSError:
            pass  # not copied before
        prune_kept_labels(folder)
        if os.path.isfile(copied):
            return copied
    path = os.path.join(folder, stem + ".gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = stem
    options.onlySelectedFeatures = selected_only
    options.attributes = [index]
    try:
        os.makedirs(folder, exist_ok=True)
        draft = tempfile.mkdtemp(prefix=".draft-", dir=folder)  # a kept copy appears whole, or not at all
    except OSError as error:
        raise UserError(tr("The labels of {} could not be written for the backend: the folder {} cannot be written "
                           "({}).").format(layer.name(), folder, error.strerror)) from None
    try:
        written = os.path.join(draft, stem + ".gpkg")
        # The GeoPackage's one timestamp (gpkg_contents.last_change) fixed for a kept copy: the same labels
        # written again (the copy pruned meanwhile) are the same bytes, which a model records by sha256.
        date = gdal.GetThreadLocalConfigOption("OGR_CURRENT_DATE", None)
        if kept:
            gdal.SetThreadLocalConfigOption("OGR_CURRENT_DATE", KEPT_COPY_DATE)
        try:
            error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
                layer, written, layer.transformContext(), options)
        finally:
            gdal.SetThreadLocalConfigOption("OGR_CURRENT_DATE", date)
        if error != QgsVectorFileWriter.WriterError.NoError:
            raise UserError(f"The labels of {layer.name()} could not be written for the backend: {message}")
        os.replace(written, path)
    finally:
        shutil.rmtree(draft, ignore_errors=True)
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


METHODS = (
    ("lora", "Small trainable adapters beside the frozen model: fast, little memory, the usual choice."),
    ("last-blocks", "Retrains the last transformer blocks of the image encoder: more change, more memory."),
    ("full", "Retrains every weight: slowest, needs the most labels and memory."),
)




class TrainTab(QObject):
    trainFinished = pyqtSignal(str)  # "done", "failed" or "cancelled"

    def __init__(self, dock, settings_loader: Callable[[], PluginSettings] = PluginSettings.load):
        super().__init__(dock)
        self.dock = dock
        self.form = dock.form
        self.settings_loader = settings_loader
        self.runner = JobRunner(self.form.trainProgressBar, [self.form.trainButton], self.form.trainCancelButton,
                                self)
        self.runner.updated.connect(self._job_updated)
        self.runner.finished.connect(self._job_finished)
        self.last_model_dir = ""
        self.last_error = ""
        self._last_message = ""
        self._shown_warnings: set[str] = set()
        for method, help_text in METHODS:
            self.form.methodCombo.addItem(method, method)
            self.form.methodCombo.setItemData(self.form.methodCombo.count() - 1, tr(help_text),
                                              Qt.ItemDataRole.ToolTipRole)
        self.form.labelsCombo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.form.trainRasterCombo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.form.labelsCombo.layerChanged.connect(self.form.classFieldCombo.setLayer)
        self.form.classFieldCombo.setLayer(self.form.labelsCombo.currentLayer())
        # As QGIS's own tools: with features selected in the labels layer, training uses those (ticked as soon
        # as there is a selection; untick it to train on all of them).
        self.selected_only_check = QCheckBox(tr("Selected features only"))
        self.selected_only_check.setToolTip(tr("Train on the features selected in the labels layer only"))
        self.form.trainForm.insertRow(2, "", self.selected_only_check)
        self._watched_labels: QgsVectorLayer | None = None
        self.form.labelsCombo.layerChanged.connect(self._labels_changed)
        self._labels_changed(self.form.labelsCombo.currentLayer())
        self.form.trainButton.clicked.connect(self.train)
        self.form.trainCancelButton.clicked.connect(self.cancel)

    @property
    def task(self):
        return self.runner.task

    # -- the labels' selection -----------------------------------------------------------------
    def _labels_changed(self, layer) -> None:
        if self._watched_labels is not None:
            try:
                self._watched_labels.selectionChanged.disconnect(self._selection_changed)
            except (TypeError, RuntimeError):  # not connected, or the layer was deleted
                pass
        self._watched_labels = layer if isinstance(layer, QgsVectorLayer) else None
        if self._watched_labels is not None:
            self._watched_labels.selectionChanged.connect(self._selection_changed)
        self.selected_only_check.setEnabled(False)  # a new layer: ticked when it has a selection
        self._selection_changed()

    def _selection_changed(self, *_args) -> None:
        layer = self._watched_labels
        selected = layer.selectedFeatureCount() if layer is not None and not sip.isdeleted(layer) else 0
        check = self.selected_only_check
        if not selected:
            check.setChecked(False)
            check.setEnabled(False)
        elif not check.isEnabled():  # a selection made: train on it unless the user unticks this
            check.setEnabled(True)
            check.setChecked(True)
        check.setText(tr("Selected features only ({})").format(selected) if selected
                      else tr("Selected features only"))

    def selected_only(self, labels: QgsVectorLayer) -> bool:
        """Whether training uses only the features selected in `labels`."""
        if labels is not self._watched_labels:  # the combo moved without saying so
            self._labels_changed(labels)
        return self.selected_only_check.isChecked() and labels.selectedFeatureCount() > 0

    def labels_text(self, labels: QgsVectorLayer) -> str:
        """Which of the labels' polygons training uses, when some are selected: never silently all or some."""
        selected = labels.selectedFeatureCount()
        if not selected:
            return ""
        if self.selected_only(labels):
            if selected == 1:
                return tr("Training on the selected polygon of {}.").format(labels.name())
            return tr("Training on the {} selected polygons of {}.").format(selected, labels.name())
        return tr("Training on all {} polygons of {} ({} selected; tick Selected features only to train on "
                  "those).").format(labels.featureCount(), labels.name(), selected)

    def set_base_models(self, models_combo) -> None:
        """The Segment tab's model list, keeping the base model the user chose or typed."""
        combo = self.form.baseModelCombo
        current = combo.currentText()
        combo.clear()
        for index in range(models_combo.count()):
            combo.addItem(models_combo.itemText(index), models_combo.itemData(index))
            source = models_combo.model().item(index)
            combo.model().item(index).setFlags(source.flags())
        found = combo.findText(current)
        if found >= 0:
            combo.setCurrentIndex(found)
        else:
            combo.setEditText(current)

    def build_request(self) -> tuple[dict[str, Any], Callable | None, str]:
        form = self.form
        raster = form.trainRasterCombo.currentLayer()
        if not isinstance(raster, QgsRasterLayer) or not raster.isValid():
            raise UserError(tr("Choose the raster to train on."))
        unusable = unusable_layer_text(raster)
        if unusable:
            raise UserError(unusable)
        labels = form.labelsCombo.currentLayer()
        if not isinstance(labels, QgsVectorLayer) or not labels.isValid():
            raise UserError(tr("Choose a polygon layer with labelled areas."))
        class_field = form.classFieldCombo.currentField()
        if not class_field:
            raise UserError(tr("Choose the field of {} that holds the class names.").format(labels.name()))
        class_field = class_field_name(labels, class_field)  # the field may have been renamed or removed since
        if labels.featureCount() == 0:
            raise UserError(tr("The labels layer {} has no polygons.").format(labels.name()))
        selected_only = self.selected_only(labels)
        name = model_folder_name(form.modelNameEdit.text(), raster.name())
        out = os.path.join(default_models_dir(), name)
        if os.path.exists(out):
            raise UserError(tr("A model called {} exists already ({}); choose another name.").format(name, out))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        request: dict[str, Any] = {
            "class_field": class_field, "out": out, "base_model": self._base_model(),
            "method": form.methodCombo.currentData(),
            "epochs": int(form.epochsSpin.value()),
            "background": form.backgroundEdit.text().strip() or None}
        bands = displayed_bands(raster)  # trained on what the analyst sees, as segment runs read it
        if bands:
            request["bands"] = bands
        prepare = None
        path = local_raster_path(raster)
        if path is not None:
            request["raster"] = path
        else:
            try:
                extent = clipped_to_layer(labels.boundingBoxOfSelected() if selected_only else labels.extent(),
                                          labels.crs(), raster)
            except ExtentError:  # labels with no image in the raster's CRS: far from it
                extent = QgsRectangle()
            if extent.isEmpty():
                raise UserError(tr("The labels of {} do not overlap the raster {}.").format(labels.name(),
                                                                                          raster.name()))
            prepare = self.dock._local_copy_step(raster, extent, self.runner)
        # The labels' copy (where one is written) last: a refusal above leaves no copy behind. It is kept (named
        # after what it holds, as Processing's): the model records it, and an evaluation on the same labels
        # knows them and scores the model's held-out strip.
        request["labels"] = labels_file(labels, class_field, kept_labels_dir, selected_only, kept=True)
        return request, prepare, out

    def _base_model(self) -> str | None:
        return self.dock.chosen_model(self.form.baseModelCombo)

    def train(self) -> None:
        if self.runner.running:
            return
        self.last_error = ""
        self.form.trainProgressBar.setFormat("%p%")
        try:
            request, prepare, out = self.build_request()
        except UserError as error:
            self.runner.remove_temporary_dirs()
            self._show(str(error), error=True)
            self.trainFinished.emit("failed")
            return
        if self.dock.manager.state != "ready" or self.dock.manager.connection is None:
            self.runner.remove_temporary_dirs()  # the labels' copy: the next press writes it again
            self._show(tr("The FarSLIP backend is not connected; press Connect below."), error=True)
            self.dock.manager.ensure()
            self.trainFinished.emit("failed")
            return
        self.form.trainLog.clear()
        self._last_message = ""
        self._shown_warnings = set()
        labels = self.form.labelsCombo.currentLayer()
        if self.labels_text(labels):
            self._show(self.labels_text(labels))
        self._show(tr("Training {} from {} ({}, {} epochs)...").format(
            os.path.basename(out), request["base_model"] or tr("the default model"), request["method"],
            request["epochs"]))
        self.runner.start(tr("FarSLIP: training {}").format(os.path.basename(out)), self.dock.manager.connection,
                          "train", request, prepare)

    def cancel(self) -> None:
        if self.runner.cancel():
            self._show(tr("Cancelling..."))

    def _show(self, text: str, error: bool = False) -> None:
        if error:
            self.last_error = text
            log(text, Qgis.MessageLevel.Warning)
        self.form.trainLog.appendHtml(f"<span style='color:#b00020'>{html.escape(text)}</span>" if error
                                      else html.escape(text))

    def _job_updated(self, job: dict) -> None:
        eta = eta_text({"eta_s": job.get("eta_s"), "state": job.get("state")})
        self.form.trainProgressBar.setFormat("%p%" + (f" - {eta}" if job.get("eta_s") is not None else ""))
        message = job.get("message") or ""
        if message and message != self._last_message and job.get("state") == "running":
            self._last_message = message  # the backend's "epoch 2/5: loss ..., val mIoU ..." or "Warning: ..."
            self._show(message)
            if message.startswith(WARNING_PREFIX):
                self._shown_warnings.add(message[len(WARNING_PREFIX):])

    def _job_finished(self, state: str, job: dict, error: str) -> None:
        self.form.trainProgressBar.setFormat("%p%")
        if state == "done":
            self._job_done(job)
        elif state == "cancelled":
            self._show(tr("Cancelled; no model was written."))
        else:  # once: the failed job's message is not logged as progress
            self._show(self.dock.job_error_text(error, self.runner.failure_kind)[0], error=True)
        self.trainFinished.emit(state)

    def _job_done(self, job: dict) -> None:
        result = job.get("result") or {}
        if job.get("cancelled_too_late"):  # the analyst pressed Cancel as the training finished
            self._show(CANCEL_TOO_LATE)
        self.last_model_dir = (result.get("outputs") or {}).get("model_dir") or job["request"].get("out", "")
        # A warning is the job's message until the next one replaces it, maybe before a poll saw it: the
        # result holds them all, and those the log does not show yet are shown now.
        for warning in [str(w) for w in result.get("warnings") or [] if w]:
            log(warning, Qgis.MessageLevel.Warning)
            if warning not in self._shown_warnings:
                self._shown_warnings.add(warning)
                self._show(tr("Warning: {}").format(warning))
        summary = metrics_text(result)
        if summary:
            self._show(summary)
        name = os.path.basename(self.last_model_dir.rstrip("/\\"))
        self._show(tr("Saved the model {} in {}; it is in the model list of the Segment tab.").format(
            name, self.last_model_dir))
        combo = self.form.modelCombo
        if combo.findData(name) < 0:
            combo.addItem(name, name)
        combo.setCurrentIndex(combo.findData(name))
        self.dock.refresh_backend_lists()
