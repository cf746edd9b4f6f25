"""The FarSLIP dock: choose a raster, an extent and class names, run, get a styled polygon layer."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCsException,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterBlockFeedback,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.gui import QgsDockWidget
from qgis.PyQt import sip, uic
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QMessageBox, QWidget

from . import messages
from .backend_manager import BackendManager, log, plain_text
from .backend_panel import BackendPanel
from .class_box import ClassBox
from .classes import bundled_presets, class_list_refusal, parse_class_text
from .client import Connection
from .exporting import ExportDialog, export_path, replaces_a_file, result_layers
from .extent_choice import ExtentChoice, ExtentError, unusable_extent_text
from .extent import (LocalCopyError, PixelWindow, crs_text, displayed_bands, export_size, gdal_dataset_name,
                     has_pixel_size, local_raster_path, transform_extent, unusable_layer_text, vrt_step,
                     whole_web_layer_text, write_geotiff)
from .job_runner import CANCELLED, DONE, JobRunner
from .jobs import CANCEL_TOO_LATE, LOST, REFUSED, JobCancelled, eta_text, features_cached
from .model_picker import ModelPicker, finetuned_class_lines
from .parameters import MAX_THRESHOLD, SegmentParameters, output_stem, safe_name
from .remembered import LastChoices
from .results import ProbabilityChoice, load_segment_result, result_classes, result_name
from .review_tab import ReviewTab, has_quality
from .search_tab import SearchTab
from .settings import PluginSettings
from .train_tab import TrainTab

FORM, _ = uic.loadUiType(os.path.join(os.path.dirname(__file__), "ui", "dock.ui"))

class UserError(ValueError):
    """Something the user can fix in the dock; the message says what."""


@dataclass
class SegmentRun:
    """A run as the form held it when Run was pressed: what is submitted, also once a starting backend is ready
    (the form may have changed meanwhile: another layer, a panned map, other classes)."""

    parameters: SegmentParameters
    prepare: Callable | None
    layer_id: str
    layer_name: str
    project: int  # FarslipDock.project_generation when Run was pressed: its result belongs to that project


class FarslipDock(QgsDockWidget):
    jobFinished = pyqtSignal(str)  # "done", "failed" or "cancelled"; for scripts and tests
    settingsRequested = pyqtSignal()
    installRequested = pyqtSignal()

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

        self.last_layers: list[Any] = []
        self.last_error = ""
        self._pending_run: SegmentRun | None = None  # pressed while the backend starts: submitted once it is ready
        self._downloading = ""  # the model a running download job fetches
        self._select_after_refresh = ""
        self._run_name = ""
        # Counts the projects the analyst opened or cleared (File > New, Open): a result is loaded into the
        # project its run was pressed in, never into another one opened while it ran.
        self.project_generation = 0
        self._job_project = 0

        form = self.form
        self.runner = JobRunner(form.progressBar, [form.runButton], form.cancelButton, self)
        self.runner.updated.connect(self._job_updated)
        self.runner.backendLost.connect(manager.lost)
        self.runner.finished.connect(self._job_finished)
        self.models = ModelPicker(form.modelCombo, form.browseModelButton, form.downloadModelButton,
                                  lambda: self.settings_loader().default_model, self)
        self.models.downloadRequested.connect(self.download_model)
        self.models.modelChosen.connect(self._model_chosen)
        self.extent = ExtentChoice(iface, form.extentCombo, form.drawButton, self)
        self.classes = ClassBox(form.presetCombo, form.classesEdit, self)
        self.classes.set_presets(bundled_presets())
        form.layerCombo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.probability = ProbabilityChoice(form.probClassCombo, self)
        for label, value in ((self.tr("None"), "none"), (self.tr("Image edges"), "edges"),
                             (self.tr("SAM (Segment Anything)"), "sam")):
            form.refineCombo.addItem(label, value)
        form.runButton.clicked.connect(self.run)
        form.cancelButton.clicked.connect(self.cancel)
        form.exportButton.clicked.connect(lambda: self.export_result())
        self.backend = BackendPanel(iface, manager, form, self)
        self.backend.listsArrived.connect(self._lists_arrived)
        self.backend.settingsRequested.connect(self.settingsRequested)
        self.backend.installRequested.connect(self.installRequested)
        form.statusMessage.linkActivated.connect(self.do_action)
        manager.ready.connect(self._backend_ready)
        manager.failed.connect(self._backend_failed)
        QgsProject.instance().layersWillBeRemoved.connect(self._layers_removed)
        QgsProject.instance().layersAdded.connect(self._layers_added)
        QgsProject.instance().readProject.connect(self.restore_choices)
        QgsProject.instance().cleared.connect(self._project_cleared)
        self.train_tab = TrainTab(self, settings_loader)
        self.train_tab.runner.backendLost.connect(manager.lost)
        self.search_tab = SearchTab(self, settings_loader)
        self.review_tab = ReviewTab(self, self.train_tab)
        self.restore_choices()

    # -- backend ------------------------------------------------------------------------------
    def show_backend_message(self, rich_text: str) -> None:
        self.backend.show_message(rich_text)

    def do_action(self, action: str) -> None:
        self.backend.do_action(action)

    def refresh_backend_lists(self) -> None:
        self.backend.refresh_lists()

    def _backend_ready(self, _connection: Connection, _health: dict) -> None:
        pending, self._pending_run = self._pending_run, None
        if pending is None:
            return
        if pending.project != self.project_generation:
            self._pending_refused(self.tr("Not run: the project was closed while the FarSLIP backend started; "
                                          "choose the layer and press Run again."))
            return
        if QgsProject.instance().mapLayer(pending.layer_id) is None:
            self._pending_refused(self.tr("Not run: the layer {} was removed from the project while the FarSLIP "
                                          "backend started; add it again and press Run.").format(pending.layer_name))
            return
        self._submit(pending)

    def _pending_refused(self, text: str) -> None:
        """A run waiting for the backend ends before it was sent: `text` says why."""
        self.runner.remove_temporary_dirs()  # a web layer's copy folder: nothing was written in it
        self.runner.set_busy(False)
        self.form.progressBar.setValue(0)
        self.show_status(text, error=True)
        self.jobFinished.emit("failed")

    def _backend_failed(self, _message: str) -> None:
        if self._pending_run:
            self._pending_run = None
            self.runner.remove_temporary_dirs()
            self.runner.set_busy(False)
            if self.manager.lost_url:  # the user's `farslip serve` stopped: say so here too, with its actions
                text, actions = self.manager.not_running_text()
                text = plain_text(text)
                self.show_status(self.tr("Not run: {}").format(text[:1].lower() + text[1:]), error=True,
                                 actions=actions)
            else:
                self.show_status(self.tr("Not run: the FarSLIP backend is not available."), error=True)
            self.jobFinished.emit("failed")

    def _lists_arrived(self, models: dict, presets: dict) -> None:
        self.set_models(models)
        self.set_sam_models(models.get("sam_models") or [])
        if presets:
            self.set_presets(presets)

    def set_models(self, models: dict) -> None:
        wanted, self._select_after_refresh = self._select_after_refresh, ""
        self.models.set_models(models, wanted)
        self.train_tab.set_base_models(self.form.modelCombo)

    def set_presets(self, presets: dict[str, list[str]]) -> None:
        self.classes.set_presets(presets)

    def preset_name(self) -> str | None:
        return self.classes.preset_name()

    def choose_preset(self, name: str) -> None:
        if not self.classes.choose_preset(name):
            raise UserError(self.tr("There is no preset called {!r}.").format(name))

    def set_sam_models(self, sam_models: list) -> None:
        """Offer SAM refinement only when the backend has SAM weights; say which file is missing otherwise."""
        present = [entry["name"] for entry in sam_models if entry.get("present")]
        item = self.form.refineCombo.model().item(self.form.refineCombo.findData("sam"))
        item.setEnabled(bool(present))
        if present:
            item.setToolTip(self.tr("Outlines drawn by {}").format(", ".join(present)))
        elif sam_models:
            missing = sam_models[0]
            item.setToolTip(self.tr("No SAM weights: put {} from {} at {}").format(
                missing.get("hf_file", ""), missing.get("hf_repo", ""), missing.get("expected_path", "")))

    # -- models -------------------------------------------------------------------------------
    def download_model(self, name: str) -> None:
        """Fetch a registry model's weights through the backend, with progress in the Segment tab."""
        if self.runner.running or self.manager.connection is None:
            self.show_status(self.tr("Connect to the backend and wait for the running job before downloading."),
                             error=True)
            return
        self._downloading = name
        self.show_status(self.tr("Downloading {}...").format(name))
        self.runner.start(self.tr("FarSLIP: downloading {}").format(name), self.manager.connection, "download",
                          {"model": name})

    def _model_chosen(self, model: str) -> None:
        """A fine-tuned model brings its own classes: fill them in, or warn when the typed ones differ."""
        trained = finetuned_class_lines(self.models.chosen_folder())
        if not trained:
            return
        typed = self.class_lines()
        if not typed:
            self.form.classesEdit.setPlainText("\n".join(trained))
        elif typed != parse_class_text("\n".join(trained)):
            self.show_status(self.tr("This model was trained on the classes {}; the classes typed here differ, "
                                     "so their results are less reliable.").format(
                                         "; ".join(f"'{line}'" for line in trained)),
                             error=True)

    # -- remembered choices ---------------------------------------------------------------------
    def choices(self) -> LastChoices:
        form = self.form
        return LastChoices(model=self.models.chosen() or "", classes=form.classesEdit.toPlainText(),
                           preset=self.preset_name() or "", threshold=float(form.thresholdSpin.value()),
                           class_raster=form.classRasterCheck.isChecked(),
                           prob_raster=form.probRasterCheck.isChecked(),
                           refine=form.refineCombo.currentData() or "none",
                           region_checks=form.regionChecksCheck.isChecked())

    def restore_choices(self) -> None:
        """The project's last choices (or the user's last ones, for a new project)."""
        last = LastChoices.load()
        form = self.form
        if last.classes:
            self.classes.set_text(last.classes)
        if last.preset:
            self.classes.show_preset(last.preset)
        if last.model:
            self.models.select(last.model)
        form.thresholdSpin.setMaximum(MAX_THRESHOLD)  # the backend refuses 1
        form.thresholdSpin.setValue(last.threshold)
        form.classRasterCheck.setChecked(last.class_raster)
        form.probRasterCheck.setChecked(last.prob_raster)
        form.refineCombo.setCurrentIndex(max(0, form.refineCombo.findData(last.refine)))
        form.regionChecksCheck.setChecked(last.region_checks)

    # -- inputs -------------------------------------------------------------------------------
    def class_lines(self) -> list[str]:
        return self.classes.class_lines()

    def model_name(self) -> str | None:
        return self.models.chosen() or self.settings_loader().default_model or None

    def chosen_model(self, combo) -> str | None:
        """The model an editable model combo names (item data, or typed text), else the default model."""
        text = combo.currentText().strip()
        index = combo.findText(text)
        value = combo.itemData(index) if index >= 0 else text
        return value or self.settings_loader().default_model or None

    @property
    def drawn_extent(self) -> tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None:
        return self.extent.drawn

    def set_drawn_extent(self, rectangle: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                         window: tuple[QgsRasterLayer, PixelWindow] | None = None) -> None:
        """The extent to segment, as if drawn on the map; with `window`, a window of a raster's own pixels that this
        rectangle is the envelope of (a search hit on a rotated grid), segmented instead when that raster is."""
        self.extent.set_drawn(rectangle, crs, window)

    def chosen_extent(self) -> tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None:
        try:
            return self.extent.chosen()
        except ExtentError as error:
            raise UserError(str(error)) from None

    def extent_in_layer_crs(self, layer: QgsRasterLayer) -> QgsRectangle:
        try:
            return self.extent.in_layer_crs(layer)
        except ExtentError as error:
            raise UserError(str(error)) from None

    def segment_parameters(self) -> tuple[SegmentParameters, Callable | None]:
        """The run's parameters and a preparation step for non-file layers (a GeoTIFF copy)."""
        layer = self.form.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise UserError(self.tr("Choose a raster layer to segment."))
        unusable = unusable_layer_text(layer)
        if unusable:
            raise UserError(unusable)
        class_lines = self.class_lines()
        if not class_lines:
            raise UserError(self.tr("Type at least one class name (one per line), or choose a preset."))
        if class_list_refusal(class_lines):
            raise UserError(class_list_refusal(class_lines))
        in_layer = self.extent_in_layer_crs(layer)
        folder = self.settings_loader().output_dir()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(self.tr("The output folder {} cannot be created ({}); choose another one in the "
                                    "FarSLIP settings.").format(folder, error.strerror)) from None
        stem = output_stem(folder, layer.name(), time.strftime("%Y%m%d-%H%M%S"))
        form = self.form
        parameters = SegmentParameters(
            class_lines=class_lines, out=stem + ".gpkg", model=self.model_name(),
            threshold=float(form.thresholdSpin.value()), preset=self.preset_name(),
            refine=form.refineCombo.currentData() or "none",
            region_checks=form.regionChecksCheck.isChecked(),
            class_raster=stem + "_classes.tif" if form.classRasterCheck.isChecked() else None,
            prob_raster=stem + "_probabilities.tif" if form.probRasterCheck.isChecked() else None,
            bands=displayed_bands(layer))
        window = self.extent.pixel_window(layer)
        if window is not None and gdal_dataset_name(layer) is not None:
            # A search hit on a rotated grid: a box in the raster's CRS that holds it (its envelope) holds much of
            # the raster around it too. A VRT of the hit's own pixels is segmented whole instead.
            return parameters, vrt_step(layer, window)
        path = local_raster_path(layer)
        if path is None and gdal_dataset_name(layer) is None:  # WMS/XYZ: a GeoTIFF of the extent
            return parameters, self._local_copy_step(layer, in_layer)
        prepare = None
        if path is None:  # another GDAL source, or a CRS set in QGIS: a VRT of the layer as QGIS sees it
            prepare = self._local_copy_step(layer, in_layer)
        else:
            parameters.raster = path
        if self.chosen_extent() is not None:
            # Already in the layer's CRS and clipped to it: a map zoomed out beyond the CRS's range (an EPSG:4326
            # canvas from -315 to 315) still means this raster, and the bbox's CRS is the one the backend reads.
            parameters.bbox = [in_layer.xMinimum(), in_layer.yMinimum(), in_layer.xMaximum(), in_layer.yMaximum()]
            parameters.bbox_crs = crs_text(layer.crs())
        return parameters, prepare

    def build_request(self) -> tuple[dict[str, Any], Callable | None]:
        """The POST /v1/segment body and a preparation step for non-file layers."""
        parameters, prepare = self.segment_parameters()
        return parameters.request(), prepare

    def _local_copy_step(self, layer: QgsRasterLayer, extent: QgsRectangle, runner: JobRunner | None = None
                         ) -> Callable:
        """A step for the job's worker thread that gives the backend a file of a layer it cannot read as is:
        a VRT of a GDAL layer (its own grid and bands, the layer's CRS), a GeoTIFF of `extent` of a WMS/XYZ one.

        The VRT is kept in the plugin's cache folder, the same file for every run on the layer (the backend's
        feature cache and search index know it again); the GeoTIFF lies in a temporary folder of `runner` (the
        Segment tab's by default), removed when the job ends.
        """
        if gdal_dataset_name(layer) is not None:
            return vrt_step(layer)
        canvas_in_layer = None
        if not has_pixel_size(layer) and extent == layer.extent():  # 'Whole layer': often the whole world
            raise UserError(whole_web_layer_text(layer.name(), self.tr(
                "zoom the map to the area and choose 'Map canvas', or draw a rectangle.")))
        folder = (runner or self.runner).temporary_dir()
        if not has_pixel_size(layer):  # a WMS/XYZ layer is fetched at the map's resolution
            try:
                canvas_in_layer = transform_extent(self.canvas.extent(), self.canvas.mapSettings().destinationCrs(),
                                                   layer.crs())
            except QgsCsException:
                raise UserError(unusable_extent_text(layer.name())) from None
        size = export_size(layer, extent, canvas_in_layer, (self.canvas.width(), self.canvas.height()))
        provider = layer.dataProvider().clone()  # a provider of its own for the worker thread
        crs = QgsCoordinateReferenceSystem(layer.crs())
        name = layer.name()  # the layer may be removed while the job runs; its name is all the step needs
        path = os.path.join(folder, safe_name(name) + ".tif")

        def write_local_copy(task, request):
            log(f"Writing {name} ({size[0]} x {size[1]} px) to {path} for the backend.")
            copying = self.tr("Copying {} ({} x {} px) for the backend").format(name, size[0], size[1])
            task.jobUpdated.emit({"message": copying, "progress": 0.0})
            # Cancel reaches the copy (tiles of a web layer may take minutes), which says how far it got.
            feedback = QgsRasterBlockFeedback()

            def copied(percent: float) -> None:
                if task.isCanceled():
                    feedback.cancel()
                else:
                    task.jobUpdated.emit({"message": f"{copying}: {percent:.0f} %", "progress": 0.0})

            feedback.progressChanged.connect(copied)
            try:
                request["raster"] = write_geotiff(provider, extent, size, crs, path, feedback=feedback,
                                                  layer_name=name)
            except LocalCopyError:
                if task.isCanceled():
                    raise JobCancelled() from None
                raise

        return write_local_copy

    # -- running ------------------------------------------------------------------------------
    def show_status(self, text: str, error: bool = False, actions: tuple[str, ...] = ()) -> None:
        """The line under the progress bar (plain text); errors are logged and may offer actions."""
        self.form.statusLabel.setStyleSheet("color: #b00020;" if error else "")
        self.form.statusLabel.setText(text)
        self.form.statusMessage.setText(messages.action_links(*actions))
        self.form.statusMessage.setVisible(bool(actions))
        if error:
            self.last_error = text
            log(text, Qgis.MessageLevel.Warning)

    def run(self) -> None:
        if self.runner.running or self._pending_run is not None:
            return
        self.last_error = ""
        try:
            parameters, prepare = self.segment_parameters()
        except UserError as error:
            self.runner.remove_temporary_dirs()  # a web layer's copy folder, made before the refusal
            self.show_status(str(error), error=True)
            self.form.progressBar.setValue(0)
            self.jobFinished.emit("failed")
            return
        self.choices().save()
        layer = self.form.layerCombo.currentLayer()
        pressed = SegmentRun(parameters, prepare, layer.id(), layer.name(), self.project_generation)
        if self.manager.state != "ready" or self.manager.connection is None:
            # What was pressed is sent once the backend is ready, whatever the form holds by then.
            self._pending_run = pressed
            self.runner.set_busy(True)
            self.show_status(self.tr("Connecting to the FarSLIP backend..."))
            self.manager.ensure()
            return
        self._submit(pressed)

    def _submit(self, run: SegmentRun) -> None:
        self._downloading = ""
        self._job_project = run.project
        parameters = run.parameters
        self._run_name = result_name(parameters.preset, parameters.class_names(), time.strftime("%H:%M:%S"))
        self.show_status(self.tr("Submitting the job..."))
        self.runner.start(self.tr("FarSLIP: segmenting {}").format(run.layer_name), self.manager.connection,
                          "segment", parameters.request(), run.prepare)

    def cancel(self) -> None:
        if self.runner.cancel():
            self.show_status(self.tr("Cancelling..."))
        elif self._pending_run:
            self._pending_run = None
            self.runner.remove_temporary_dirs()
            self.runner.set_busy(False)
            self.show_status(self.tr("Cancelled."))
            self.jobFinished.emit("cancelled")

    def _job_updated(self, job: dict) -> None:
        self.form.statusLabel.setStyleSheet("")
        self.form.statusLabel.setText(eta_text(job))

    def _job_finished(self, state: str, job: dict, error: str) -> None:
        if self._downloading:
            self._download_finished(state, error)
            return
        if state == DONE and self._job_project != self.project_generation:
            self._result_of_closed_project(job)
        elif state == DONE:
            state = self._load_result(job)
        elif state == CANCELLED:
            self.show_status(self.tr("Cancelled; nothing was written."))
        else:
            self._show_job_error(error, self.runner.failure_kind)
        self.jobFinished.emit(state)

    def job_error_text(self, error: str, failure_kind: str) -> tuple[str, tuple[str, ...]]:
        """What a failed job says to the user (plain text), and the actions offered with it."""
        if failure_kind == LOST and self.manager.lost_url:  # the user's `farslip serve` is gone
            text, actions = self.manager.not_running_text()
            return plain_text(text), actions
        if failure_kind == LOST:  # the plugin's own backend: Run starts it again
            return error, (messages.RESTART, messages.OPEN_LOG)
        if "refuses the plugin's token" in error:
            return error, (messages.SETTINGS, messages.RESTART)
        if failure_kind == REFUSED:  # the request as sent was refused: the sentence says what to change
            return error, ()
        return error, (messages.OPEN_LOG,)

    def _show_job_error(self, error: str, failure_kind: str = "") -> None:
        text, actions = self.job_error_text(error, failure_kind)
        self.show_status(text, error=True, actions=actions)

    def _download_finished(self, state: str, error: str) -> None:
        name, self._downloading = self._downloading, ""
        if state == DONE:
            self.show_status(self.tr("Downloaded {}; it is chosen in the model list.").format(name))
            self._select_after_refresh = name
            self.refresh_backend_lists()
        elif state == CANCELLED:
            self.show_status(self.tr("The download of {} was cancelled.").format(name))
        else:
            self._show_job_error(error, self.runner.failure_kind)
        self.jobFinished.emit(state)

    def _project_cleared(self) -> None:
        self.project_generation += 1
        self.search_tab.forget_hits()  # hits on a raster of the project closed

    def _result_of_closed_project(self, job: dict) -> None:
        """A run that ended after the project it was pressed in was closed: its result is not added to the
        project open now (it is not that project's); its files are kept and said, here and in the message bar."""
        outputs = (job.get("result") or {}).get("outputs") or {}
        files = [str(outputs[key]) for key in ("vector", "coarse_vector", "class_raster", "prob_raster")
                 if outputs.get(key)]
        text = self.tr("Done, but the project this run was started in was closed meanwhile: its result was not "
                       "added to the project open now. Its files are kept: {}. Add them with Layer > Add Layer, "
                       "or run again in this project.").format(", ".join(files) or self.tr("none reported"))
        self.show_status(text)
        log(text, Qgis.MessageLevel.Info)
        try:
            self.iface.messageBar().pushMessage("FarSLIP", text, Qgis.MessageLevel.Info, 0)
        except (AttributeError, TypeError):  # an interface without a message bar (scripts)
            pass

    def _load_result(self, job: dict) -> str:
        try:
            self.last_layers = load_segment_result(job, self._run_name)
        except RuntimeError as error:
            self.show_status(str(error), error=True)
            return "failed"
        classes = (job.get("result") or {}).get("classes") or []
        found = [f"{item['class']} ({item['polygons']})" for item in classes if item.get("polygons")]
        done = ", ".join(found) if found else self.tr("no polygons found")
        cached, tiles = features_cached(job)
        if cached and cached == tiles:
            status = self.tr("Done: {}; features cached.").format(done)
        elif cached:
            status = self.tr("Done: {}; features cached for {} of {} tiles.").format(done, cached, tiles)
        else:
            status = self.tr("Done: {}.").format(done)
        # What the backend warns of (one class alone, names the model cannot read, untrained classes) is said
        # under the result, and logged.
        warnings = [str(w) for w in (job.get("result") or {}).get("warnings") or [] if w]
        for warning in warnings:
            log(warning, Qgis.MessageLevel.Warning)
        late = [CANCEL_TOO_LATE] if job.get("cancelled_too_late") else []  # the analyst pressed Cancel
        self.show_status("\n".join([*late, status, *(self.tr("Warning: {}").format(w) for w in warnings)]))
        self.form.exportButton.setEnabled(True)
        self.probability.offer(self.last_layers, result_classes(job))
        vectors = [layer for layer in self.last_layers if has_quality(layer)]
        if vectors:
            self.review_tab.review(vectors[0], ((job.get("result") or {}).get("quality") or {}).get("estimated_miou"))
        return DONE

    # -- export -------------------------------------------------------------------------------
    def export_result(self, path: str | None = None, layer=None) -> str | None:
        """Export a FarSLIP result (the latest by default) with its style; without `path`, ask."""
        dialog = ExportDialog(self.last_layers, self.settings_loader().output_dir(), self)
        if path is None:
            if not dialog.has_results():
                self.show_status(self.tr("There is no FarSLIP result to export yet; run a segmentation first."),
                                 error=True)
                return None
            if not dialog.exec():
                return None
            chosen = dialog.chosen_path()
            # A typed name is not checked by the file picker: an existing shapefile is replaced only when asked.
            if chosen and replaces_a_file(chosen) and not self.confirm_replace(export_path(chosen)):
                self.show_status(self.tr("Not exported; {} is unchanged.").format(export_path(chosen)))
                return None
            return self._exported(dialog.export())
        return self._exported(dialog.export(path, layer))

    def confirm_replace(self, path: str) -> bool:
        """Ask before an export replaces an existing shapefile (with its .dbf, .shx, .prj and style)."""
        answer = QMessageBox.question(
            self, self.tr("Replace the shapefile?"),
            self.tr("{} exists. Replace it (with its .dbf, .shx, .prj and style) by the exported result?").format(
                path), QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _exported(self, outcome: tuple[str | None, str]) -> str | None:
        path, message = outcome
        self.show_status(message, error=path is None)
        return path

    def _layers_removed(self, layer_ids) -> None:
        self.last_layers = [layer for layer in self.last_layers
                            if not sip.isdeleted(layer) and layer.id() not in layer_ids]
        self.probability.forget(layer_ids)
        # Export offers every FarSLIP result in the project, not only the last run's.
        self.form.exportButton.setEnabled(any(layer.id() not in layer_ids for layer in result_layers()))

    def _layers_added(self, layers) -> None:
        self.probability.adopt(layers)
        if result_layers():  # a result of an earlier session, in a project opened now
            self.form.exportButton.setEnabled(True)

    def running_jobs(self) -> list[str]:
        """The dock's jobs running on the backend now, in words ("a segmentation", "a training run", "a search")."""
        jobs = []
        if self.runner.running:
            jobs.append(self.tr("a segmentation"))
        if self.train_tab.runner.running:
            jobs.append(self.tr("a training run"))
        if self.search_tab.task is not None:
            jobs.append(self.tr("a search"))
        return jobs

    def cancel_jobs(self) -> None:
        """Cancel the dock's running jobs (each ends as cancelled: nothing of it is written)."""
        self.runner.cancel()
        self.train_tab.runner.cancel()
        if self.search_tab.task is not None:
            self.search_tab.task.cancel()

    def close_down(self) -> None:
        """Called by the plugin's unload: cancel a running job, release the map tool."""
        self.runner.cancel()
        self.train_tab.runner.cancel()
        self.search_tab.close_down()
        self.extent.close_down()
        project = QgsProject.instance()
        for signal, slot in ((project.layersWillBeRemoved, self._layers_removed),
                             (project.layersAdded, self._layers_added),
                             (project.readProject, self.restore_choices),
                             (project.cleared, self._project_cleared)):
            try:
                signal.disconnect(slot)
            except TypeError:
                pass
