"""Processing provider: tr("Segment raster by class names"), for batch mode and the graphical modeler."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from typing import Callable

from qgis.core import (
    QgsDataSourceUri,
    QgsRasterLayer,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsRectangle,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingProvider,
    QgsProcessingUtils,
)
from qgis.PyQt.QtGui import QIcon

from .backend_manager import BackendManager
from .classes import bundled_presets, class_list_refusal, parse_class_text, resources_dir
from .client import BackendClient, BackendError, BackendUnreachable
from .filenames import gpkg_table_name, sqlite_uri
from .extent import (crs_text, displayed_bands, export_size, gdal_dataset_name, local_raster_path,
                     unusable_layer_text, vrt_arguments, whole_web_layer_text, write_geotiff, write_vrt)
from .messages import processing_words
from .model_picker import finetuned_class_lines
from .jobs import CANCEL_TOO_LATE, BackendStopped, JobCancelled, PreparationError, run_job
from .parameters import MAX_THRESHOLD, REFINE_CHOICES, SegmentParameters
from .results import categorized_renderer
from .search_hits import rank_labels, score_renderer
from .settings import PluginSettings
from .train_tab import (METHODS, UserError, class_field_name, default_models_dir, kept_labels_dir, labels_file,
                        metrics_text, model_folder_name)
from .i18n import tr

NO_PRESET = "(none: the classes typed below)"
# Post-processors must outlive processAlgorithm; QGIS calls them after the run, in the GUI thread.
_POST_PROCESSORS: list[QgsProcessingLayerPostProcessorInterface] = []


def icon() -> QIcon:
    root = resources_dir()
    return QIcon(os.path.join(root, "icons", "farslip.svg")) if root else QIcon()



def extent_on_raster(algorithm, parameters: dict, name: str, context, layer) -> QgsRectangle | None:
    """The extent parameter `name` in the raster layer's CRS, clipped to the raster (None when none was given):
    an extent reaching beyond the raster, or beyond its CRS's range, still means the part on the raster.
    QgsProcessingException where it does not overlap the raster."""
    if not parameters.get(name):
        return None
    extent = algorithm.parameterAsExtent(parameters, name, context, layer.crs()).intersect(layer.extent())
    if extent.isEmpty() or extent.width() <= 0 or extent.height() <= 0:
        raise QgsProcessingException(tr("The extent does not overlap the raster {}.").format(layer.name()))
    return extent

class StyleResult(QgsProcessingLayerPostProcessorInterface):
    def __init__(self, classes: list[tuple[str, int]]):
        super().__init__()
        self.classes = classes

    def postProcessLayer(self, layer, context, feedback):
        if layer is not None and layer.isValid() and self.classes:
            layer.setRenderer(categorized_renderer(self.classes))
            layer.triggerRepaint()


class BackendAlgorithm(QgsProcessingAlgorithm):
    """An algorithm whose work is a job of the backend the plugin manages."""

    INPUT, LABELS, CLASS_FIELD = "INPUT", "LABELS", "CLASS_FIELD"

    def __init__(self, manager_getter: Callable[[], BackendManager | None]):
        super().__init__()
        self.manager_getter = manager_getter

    def createInstance(self):
        return type(self)(self.manager_getter)

    def icon(self):
        return icon()

    def add_labelled_inputs(self) -> None:
        """The raster and the polygon layer whose class field labels it (Train, Evaluate)."""
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer")))
        # A feature source, as QGIS's own algorithms take an input: its "Selected features only" box trains on
        # (or scores against) the selected polygons, as the Train tab's does.
        self.addParameter(QgsProcessingParameterFeatureSource(self.LABELS, tr("Labelled polygons"),
                                                              [QgsProcessing.SourceType.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(self.CLASS_FIELD, tr("Class field"),
                                                      parentLayerParameterName=self.LABELS))

    def raster_file(self, parameters, context) -> tuple[str, QgsRasterLayer]:
        """A file the backend reads the INPUT raster layer from (Train, Evaluate and Search): its own file, or
        the kept VRT (`layer_vrt`) of a GDAL layer that is not a plain file or whose CRS was set in QGIS."""
        raster = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if raster is None or gdal_dataset_name(raster) is None:
            raise QgsProcessingException(tr("The backend reads the raster from a file: choose a GeoTIFF layer."))
        refuse_missing_file(raster)
        return local_raster_path(raster) or layer_vrt(raster), raster

    def labelled_inputs(self, parameters, context) -> dict:
        """raster, labels (files the backend can read; a copy of the labels, kept, where needed) and class_field."""
        path, _ = self.raster_file(parameters, context)
        given = parameters.get(self.LABELS)
        selected_only = False
        if isinstance(given, QgsProcessingFeatureSourceDefinition):  # the layer, with "Selected features only"
            selected_only = given.selectedFeaturesOnly
            if given.featureLimit > 0:  # the dialog's Advanced options: a sample of the polygons would train
                raise QgsProcessingException(tr(
                    "A feature limit ({}) is set on the labelled polygons; FarSLIP uses all of them (or the "
                    "selected ones): remove the limit, or select the polygons to use.").format(given.featureLimit))
            given, _ok = given.source.valueAsString(context.expressionContext(), "")
        labels = self.parameterAsVectorLayer({**parameters, self.LABELS: given}, self.LABELS, context)
        if labels is None or not labels.isValid():
            raise QgsProcessingException(tr("The labelled polygons layer cannot be opened."))
        if selected_only and not labels.selectedFeatureCount():
            raise QgsProcessingException(tr("No polygons of {} are selected; select the labelled polygons to use, "
                                            "or untick Selected features only.").format(labels.name()))
        try:
            # A field the layer lacks (misspelled in a script, of another layer in a model) is refused in words.
            class_field = class_field_name(labels, self.parameterAsString(parameters, self.CLASS_FIELD, context))
            # A copy is kept, named after its content: Train, then Evaluate on the same layer send the same file
            # (its sha256 is the one the model records, so the held-out strip is scored).
            return {"raster": path, "labels": labels_file(labels, class_field, kept_labels_dir, selected_only,
                                                          kept=True),
                    "class_field": class_field}
        except UserError as error:
            raise QgsProcessingException(str(error)) from None


def finetuned_folder(model: str | None) -> str | None:
    """The folder of a fine-tuned model given as its folder or by its name (a folder of the models folder)."""
    if not model or os.path.isdir(model):
        return model or None
    named = os.path.join(default_models_dir(), model)
    return named if os.path.isdir(named) else None


def refuse_missing_file(layer: QgsRasterLayer) -> None:
    """Stop the algorithm with a sentence when the layer's file is gone (deleted or moved since it was loaded)."""
    unusable = unusable_layer_text(layer)
    if unusable:
        raise QgsProcessingException(unusable)


def layer_vrt(layer: QgsRasterLayer) -> str:
    """A VRT of a GDAL layer as QGIS shows it (its CRS, bands and masks), kept in the plugin's cache folder: the
    same file on every run, which the backend's feature cache and search index know again."""
    try:
        return write_vrt(*vrt_arguments(layer))
    except PreparationError as error:
        raise QgsProcessingException(str(error)) from None


def load_instead(context, given: str, source: str) -> str:
    """`source` is what QGIS loads when the algorithm ends, in place of the output `given` (same details)."""
    if context.willLoadLayerOnCompletion(given):
        layers = context.layersToLoadOnCompletion()
        layers[source] = layers.pop(given)
        context.setLayersToLoadOnCompletion(layers)
    return source


def file_layer_name(path: str) -> str:
    """The layer the backend writes a result to: named after the file (in a GeoPackage, as it may hold it:
    gpkg_table_name), beside any other layers of an existing GeoPackage, which it keeps."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return gpkg_table_name(stem) if path.lower().endswith(".gpkg") else stem


def gpkg_tables(path: str) -> list[str]:
    """The tables an existing GeoPackage lists; QgsProcessingException when it cannot be read as one (the check
    that writing into it replaces no other layer cannot be made: the write is not risked)."""
    try:
        with contextlib.closing(sqlite3.connect(sqlite_uri(path), uri=True)) as db:
            return [str(row[0]) for row in db.execute("SELECT table_name FROM gpkg_contents")]
    except sqlite3.Error as error:
        raise QgsProcessingException(tr(
            "The GeoPackage {} cannot be read ({}), so FarSLIP cannot check which of its layers writing into it "
            "would replace; close it in other programs, or choose another file.").format(path, error)) from None


def output_file(out: str, context, feedback=None) -> str:
    """The file an algorithm's vector output names. QGIS's "Save to GeoPackage..." gives an OGR URI
    (ogr:dbname='/x/y.gpkg' table="name" (geom)); the backend writes a file, its layer named after the file
    (an existing GeoPackage keeps its other layers), so the table named in the URI is said to be another
    name, and refused where it would replace a layer of that other name the user did not choose. A path without
    an extension is a GeoPackage (.gpkg appended), as QGIS's own algorithms write it."""
    if out.startswith("memory:"):  # a script's memory layer: the backend writes files, so a temporary one
        path = QgsProcessingUtils.generateTempFilename("farslip_result.gpkg")
        return load_instead(context, out, path)
    if not out.startswith("ogr:"):
        if not os.path.splitext(out)[1]:  # as QGIS's own algorithms write a path without an extension
            return load_instead(context, out, out + ".gpkg")
        return out
    uri = QgsDataSourceUri(out[len("ogr:"):])
    path = uri.database()
    if not path or not os.path.isabs(path):
        raise QgsProcessingException(tr("The output {} names no file; choose 'Save to File...' and give a .gpkg "
                                        "file.").format(out))
    written = file_layer_name(path)
    asked = uri.table() or uri.param("table")
    if asked and asked.lower() != written.lower():
        if os.path.exists(path) and written.lower() in (name.lower() for name in gpkg_tables(path)):
            raise QgsProcessingException(tr(
                "FarSLIP names its layer after the file, so writing into {} would replace its layer '{}', not "
                "create '{}'; choose another GeoPackage or 'Save to File...'.").format(path, written, asked))
        if feedback is not None:
            feedback.pushWarning(tr("The layer in {} is named '{}' after the file (not '{}').").format(
                path, written, asked))
    return load_instead(context, out, path)


def loaded_output(out: str, context, layer: str | None = None) -> str:
    """What an algorithm returns, and QGIS loads, for the vector file `out` the backend wrote: in a GeoPackage,
    which may hold other layers (the backend keeps them), the written layer (`path|layername=...`), not the
    file's first table."""
    if not out.lower().endswith(".gpkg"):
        return out
    return load_instead(context, out, f"{out}|layername={layer or file_layer_name(out)}")


def run_backend_job(manager: BackendManager | None, kind: str, request: dict, feedback) -> dict:
    """Run one backend job for an algorithm: progress and messages to the feedback, cancel honoured."""
    if manager is None:
        raise QgsProcessingException(tr("The FarSLIP plugin is not loaded."))
    with manager.processing_job(JOB_WORDS.get(kind, tr("a job"))) as switching:
        return _run_tracked_job(manager, kind, request, feedback, switching)


def _run_tracked_job(manager: BackendManager, kind: str, request: dict, feedback, switching) -> dict:
    """run_backend_job's work; `switching` is set when the analyst cancels the job to switch the backend."""

    def is_cancelled() -> bool:
        return feedback.isCanceled() or switching.is_set()

    try:
        connection = manager.wait_ready(should_cancel=is_cancelled)
        feedback.pushInfo(f"FarSLIP backend at {connection.url}")
        last_message = []

        def on_update(job):
            feedback.setProgress(100.0 * float(job.get("progress") or 0.0))
            message = job.get("message")
            if message and message not in last_message[-1:]:
                last_message.append(message)
                feedback.setProgressText(message)
                if kind == "train":
                    feedback.pushInfo(message)

        try:
            job = run_job(BackendClient(connection), kind, request, on_update, is_cancelled)
            if job.get("cancelled_too_late"):  # the job's results are written (and kept): the run ends done
                feedback.pushWarning(CANCEL_TOO_LATE)
            # Warnings, and the notices a search gives ("'a lake' has 6 hits, not the 10 asked for ..."), in the
            # algorithm's words; the dock shows both beside its result.
            result = job.get("result") or {}
            for line in [*(result.get("warnings") or []), *(result.get("notices") or [])]:
                if line:
                    feedback.pushWarning(processing_words(str(line)))
            return job
        except BackendUnreachable as error:
            own = manager.restarts_own_backend()
            manager.report_lost(connection.url)  # the next run looks for the backend again
            what = tr("The FarSLIP backend stopped while the job was running (it crashed, ran out of memory or was "
                      "closed); nothing was written. Its log says why it stopped.") if isinstance(
                error, BackendStopped) else str(error)
            if own:
                raise BackendError(what + " " + tr("Run the algorithm again: the plugin starts a new backend.")
                                   ) from None
            raise BackendError(what + " " + tr(
                "Start 'farslip serve' again (or press Restart backend in the FarSLIP panel to let the plugin start "
                "its own), then run the algorithm again.")) from None
    except JobCancelled:
        raise QgsProcessingException(_cancelled_words(switching)) from None
    except BackendError as error:
        if is_cancelled():  # cancelled while the backend was being looked for or started
            raise QgsProcessingException(_cancelled_words(switching)) from None
        raise QgsProcessingException(str(error)) from None


# A Processing algorithm's job, in the words of the question asked before the backend is switched under it.
JOB_WORDS = {"segment": tr("a segmentation (Processing)"), "train": tr("a training run (Processing)"),
             "evaluate": tr("an evaluation (Processing)"), "search": tr("a search (Processing)")}


def _cancelled_words(switching) -> str:
    if switching.is_set():
        return tr("Cancelled to switch to the new FarSLIP backend; nothing was written. Run the algorithm again.")
    return tr("Cancelled; nothing was written.")


class SegmentByClassNames(BackendAlgorithm):
    INPUT, EXTENT, CLASSES, MODEL, THRESHOLD, OUTPUT = "INPUT", "EXTENT", "CLASSES", "MODEL", "THRESHOLD", "OUTPUT"
    PRESET, REFINE, REGION_CHECKS = "PRESET", "REFINE", "REGION_CHECKS"

    def name(self):
        return "segment_by_class_names"

    def displayName(self):
        return tr("Segment raster by class names")

    def shortHelpString(self):
        return tr("Open-vocabulary segmentation with FarSLIP: type the classes, one per line (commas separate "
                  "synonyms, e.g. 'road, parking lot'), or choose a preset, and get a polygon layer with the "
                  "fields class, class_id, score_mean, score_max and area_m2, in the raster's CRS. The FarSLIP "
                  "backend runs in its own process; the plugin starts it when needed.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer")))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, tr("Extent (default: the whole raster)"),
                                                       optional=True))
        self.presets = bundled_presets()
        self.addParameter(QgsProcessingParameterEnum(
            self.PRESET, tr("Preset (used when no classes are typed)"), [NO_PRESET, *sorted(self.presets)],
            defaultValue=0, optional=True))
        self.addParameter(QgsProcessingParameterString(self.CLASSES, tr("Classes, one per line"), multiLine=True,
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.MODEL,
            tr("Model (name, checkpoint file or fine-tuned model folder; empty: Settings -> Default model)"),
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, tr("Score threshold (pixels below it stay unclassified)"),
            QgsProcessingParameterNumber.Type.Double, 0.0, minValue=0.0, maxValue=MAX_THRESHOLD))
        self.addParameter(QgsProcessingParameterEnum(
            self.REFINE, tr("Refine outlines (none; image edges; SAM, needs SAM weights in the backend)"),
            [tr("None"), tr("Image edges"), tr("SAM (Segment Anything)")], defaultValue=0, optional=True))
        self.addParameter(QgsProcessingParameterBoolean(
            self.REGION_CHECKS, tr("Check the largest polygons with the whole-image model (a more reliable quality "
                                   "estimate; off: faster re-runs with other classes)"), defaultValue=True))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, tr("Segmented polygons"), QgsProcessing.SourceType.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(tr("The raster layer cannot be opened."))
        refuse_missing_file(layer)
        class_lines = parse_class_text(self.parameterAsString(parameters, self.CLASSES, context))
        preset_index = self.parameterAsEnum(parameters, self.PRESET, context)
        preset = sorted(self.presets)[preset_index - 1] if preset_index > 0 else None
        if not class_lines and preset:
            class_lines = list(self.presets[preset])
        # An empty model means the one chosen in the FarSLIP settings, as in the dock.
        model = self.parameterAsString(parameters, self.MODEL, context).strip() or PluginSettings.load().default_model
        # A fine-tuned model brings its own classes (the dock fills them in): used when none are given.
        trained = finetuned_class_lines(finetuned_folder(model))
        if not class_lines and trained:
            class_lines = parse_class_text("\n".join(trained))  # as the dock's class box reads them
            feedback.pushInfo(tr("Classes of the fine-tuned model {}: {}").format(
                model, "; ".join(f"'{line}'" for line in trained)))
        elif trained and class_lines != parse_class_text("\n".join(trained)):
            feedback.pushWarning(tr("This model was trained on the classes {}; the classes given differ, so their "
                                    "results are less reliable.").format("; ".join(f"'{line}'" for line in trained)))
        if not class_lines:
            raise QgsProcessingException(tr("Give at least one class name (one per line), or choose a preset."))
        if class_list_refusal(class_lines):
            raise QgsProcessingException(class_list_refusal(class_lines))
        out = output_file(self.parameterAsOutputLayer(parameters, self.OUTPUT, context), context, feedback)
        segment = SegmentParameters(class_lines=class_lines, out=out, model=model or None,
                                    threshold=self.parameterAsDouble(parameters, self.THRESHOLD, context),
                                    overwrite=True,
                                    refine=REFINE_CHOICES[self.parameterAsEnum(parameters, self.REFINE, context)],
                                    region_checks=self.parameterAsBool(parameters, self.REGION_CHECKS, context),
                                    bands=displayed_bands(layer))

        extent = extent_on_raster(self, parameters, self.EXTENT, context, layer)
        # A GeoTIFF copy of a WMS/XYZ layer lives as long as the job (a GDAL layer's VRT is kept: `layer_vrt`).
        with tempfile.TemporaryDirectory(prefix="farslip-") as folder:
            path = local_raster_path(layer)
            if path is None and gdal_dataset_name(layer) is not None:
                # Another GDAL source (/vsizip/, NETCDF:, GPKG:) or a CRS set in QGIS: a VRT of the layer.
                path = layer_vrt(layer)
            elif path is None:
                # A WMS/XYZ layer: the backend reads files, so write the extent to a GeoTIFF first.
                if extent is None:
                    raise QgsProcessingException(whole_web_layer_text(
                        layer.name(), "give the area to segment as Extent."))
                size = export_size(layer, extent, extent, (2048, 2048))
                path = os.path.join(folder, "raster.tif")
                feedback.pushInfo(f"Writing {layer.name()} ({size[0]} x {size[1]} px) to {path}")
                try:
                    write_geotiff(layer.dataProvider().clone(), extent, size, layer.crs(), path,
                                  layer_name=layer.name())
                except PreparationError as error:
                    raise QgsProcessingException(str(error)) from None
                extent = None  # the copy is the extent
            if extent is not None:
                segment.bbox = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
                segment.bbox_crs = crs_text(layer.crs())
            segment.raster = path
            if segment.model:
                feedback.pushInfo(f"Model: {segment.model}")
            job = run_backend_job(self.manager_getter(), "segment", segment.request(), feedback)

        classes = [(str(item["class"]), int(item["class_id"])) for item in (job.get("result") or {}).get("classes", [])]
        for item in (job.get("result") or {}).get("classes", []):
            feedback.pushInfo(f"{item['class']}: {item['polygons']} polygons, {item['area_m2']:.0f} m²")
        out = loaded_output(out, context, (job.get("result") or {}).get("layer"))
        if context.willLoadLayerOnCompletion(out):
            post_processor = StyleResult(classes)
            _POST_PROCESSORS.append(post_processor)
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(post_processor)
        return {self.OUTPUT: out}


class TrainOnLabels(BackendAlgorithm):
    """Fine-tune a model on polygons labelled with their class; the Train tab's job, for models and batches."""

    BACKGROUND = "BACKGROUND"
    BASE_MODEL, METHOD, EPOCHS, NAME, OUTPUT = "BASE_MODEL", "METHOD", "EPOCHS", "NAME", "OUTPUT"

    def name(self):
        return "train_on_labelled_polygons"

    def displayName(self):
        return tr("Fine-tune a model on labelled polygons")

    def shortHelpString(self):
        methods = "; ".join(f"{name}: {tr(text)}" for name, text in METHODS)
        return tr("Fine-tunes a FarSLIP model on a raster and a polygon layer whose class field names each area's "
                  "class. Methods: {} The new model is a folder in the backend's models folder; give it to "
                  "'Segment raster by class names' as the model.").format(methods)

    def initAlgorithm(self, config=None):
        self.add_labelled_inputs()
        self.addParameter(QgsProcessingParameterString(self.BACKGROUND, tr("Class for unlabelled pixels (optional)"),
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(
            self.BASE_MODEL, tr("Base model (empty: Settings -> Default model)"), optional=True))
        self.addParameter(QgsProcessingParameterEnum(self.METHOD, tr("Method"), [name for name, _ in METHODS],
                                                     defaultValue=0))
        self.addParameter(QgsProcessingParameterNumber(self.EPOCHS, tr("Epochs"),
                                                       QgsProcessingParameterNumber.Type.Integer,
                                                       10, minValue=1, maxValue=1000))
        self.addParameter(QgsProcessingParameterString(self.NAME, tr("Name of the new model")))
        self.addOutput(QgsProcessingOutputFolder(self.OUTPUT, tr("Fine-tuned model folder")))

    def processAlgorithm(self, parameters, context, feedback):
        raster = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        name = model_folder_name(self.parameterAsString(parameters, self.NAME, context),
                                 raster.name() if raster is not None else "model")
        out = os.path.join(default_models_dir(), name)
        if os.path.exists(out):
            raise QgsProcessingException(
                tr("A model called {} exists already ({}); choose another name.").format(name, out))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        request = {**self.labelled_inputs(parameters, context), "out": out,
                   "base_model": (self.parameterAsString(parameters, self.BASE_MODEL, context).strip()
                                  or PluginSettings.load().default_model or None),
                   "method": METHODS[self.parameterAsEnum(parameters, self.METHOD, context)][0],
                   "epochs": self.parameterAsInt(parameters, self.EPOCHS, context),
                   "background": self.parameterAsString(parameters, self.BACKGROUND, context).strip() or None}
        job = run_backend_job(self.manager_getter(), "train", request, feedback)
        model_dir = ((job.get("result") or {}).get("outputs") or {}).get("model_dir") or out
        summary = metrics_text(job.get("result") or {})
        if summary:
            feedback.pushInfo(summary)
        return {self.OUTPUT: model_dir}


class EvaluateOnLabels(BackendAlgorithm):
    """Score a model against labelled polygons (per-class IoU, mIoU): `farslip evaluate` as an algorithm."""

    MODEL, BACKGROUND = "MODEL", "BACKGROUND"
    OUTPUT, MIOU = "OUTPUT", "MIOU"

    def name(self):
        return "evaluate_on_labelled_polygons"

    def displayName(self):
        return tr("Evaluate a model on labelled polygons")

    def shortHelpString(self):
        return tr("Segments the labelled area with the model and compares it with the labels: per-class IoU and "
                  "accuracy, mIoU. A model fine-tuned on these same files is scored on its held-out validation "
                  "strip. The report is written as JSON; the mIoU is an output for the graphical modeler.")

    def initAlgorithm(self, config=None):
        self.add_labelled_inputs()
        self.addParameter(QgsProcessingParameterString(
            self.MODEL, tr("Model (empty: Settings -> Default model)"), optional=True))
        self.addParameter(QgsProcessingParameterString(self.BACKGROUND, tr("Class for unlabelled pixels (optional)"),
                                                       optional=True))
        self.addParameter(QgsProcessingParameterFileDestination(self.OUTPUT, tr("Evaluation report"),
                                                                "JSON (*.json)"))
        self.addOutput(QgsProcessingOutputNumber(self.MIOU, tr("mIoU")))

    def processAlgorithm(self, parameters, context, feedback):
        out_json = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        # QGIS's file dialog has asked before replacing an existing report.
        request = {**self.labelled_inputs(parameters, context), "out_json": out_json, "overwrite": True,
                   "model": (self.parameterAsString(parameters, self.MODEL, context).strip()
                             or PluginSettings.load().default_model or None),
                   "background": self.parameterAsString(parameters, self.BACKGROUND, context).strip() or None}
        job = run_backend_job(self.manager_getter(), "evaluate", request, feedback)
        metrics = (job.get("result") or {}).get("metrics") or {}
        for item in metrics.get("classes", []):
            iou = item.get("iou")
            feedback.pushInfo(f"{item['class']}: IoU {'n/a' if iou is None else f'{100 * iou:.1f} %'}")
        miou = metrics.get("miou")
        feedback.pushInfo(tr("mIoU: {} ({} split)").format("n/a" if miou is None else f"{100 * miou:.1f} %",
                                                          metrics.get("split", "")))
        return {self.OUTPUT: out_json, self.MIOU: miou}


class StyleHits(QgsProcessingLayerPostProcessorInterface):
    def postProcessLayer(self, layer, context, feedback):
        if layer is not None and layer.isValid():
            if layer.featureCount() > 0:
                layer.setRenderer(score_renderer(layer))
            layer.setLabeling(rank_labels())
            layer.setLabelsEnabled(True)
            layer.triggerRepaint()


class SearchBySentences(BackendAlgorithm):
    """The Search tab's job for models and batches: places of a raster that match sentences, ranked."""

    SENTENCES, TOP, MODEL, EXTENT, OUTPUT = "SENTENCES", "TOP", "MODEL", "EXTENT", "OUTPUT"

    def name(self):
        return "search_by_sentences"

    def displayName(self):
        return tr("Search raster by sentences")

    def shortHelpString(self):
        return tr("Finds the places of a raster that best match sentences such as 'a harbour with many boats' "
                  "(one per line) and returns them as ranked polygons with their score.")

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer")))
        self.addParameter(QgsProcessingParameterString(self.SENTENCES, tr("Sentences, one per line"),
                                                       multiLine=True))
        self.addParameter(QgsProcessingParameterNumber(self.TOP, tr("Number of places per sentence"),
                                                       QgsProcessingParameterNumber.Type.Integer, 20, minValue=1,
                                                       maxValue=10000))
        self.addParameter(QgsProcessingParameterString(
            self.MODEL, tr("Model (empty: Settings -> Default model)"), optional=True))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, tr("Extent (default: the whole raster)"),
                                                       optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, tr("Places found"), QgsProcessing.SourceType.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):
        sentences = [line.strip() for line in self.parameterAsString(parameters, self.SENTENCES, context)
                     .splitlines() if line.strip()]
        if not sentences:
            raise QgsProcessingException(tr("Give at least one sentence to search for."))
        out = output_file(self.parameterAsOutputLayer(parameters, self.OUTPUT, context), context, feedback)
        path, raster = self.raster_file(parameters, context)
        request = {"raster": path, "sentences": sentences, "out": out, "overwrite": True,
                   "top": self.parameterAsInt(parameters, self.TOP, context),
                   "model": (self.parameterAsString(parameters, self.MODEL, context).strip()
                             or PluginSettings.load().default_model or None)}
        extent = extent_on_raster(self, parameters, self.EXTENT, context, raster)
        if extent is not None:  # clipped to the raster, in its CRS, as Segment sends it
            request["bbox"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
            request["bbox_crs"] = crs_text(raster.crs())
        run_backend_job(self.manager_getter(), "search", request, feedback)
        out = loaded_output(out, context)
        if context.willLoadLayerOnCompletion(out):
            post_processor = StyleHits()
            _POST_PROCESSORS.append(post_processor)
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(post_processor)
        return {self.OUTPUT: out}


class FarslipProvider(QgsProcessingProvider):
    def __init__(self, manager_getter: Callable[[], BackendManager | None]):
        super().__init__()
        self.manager_getter = manager_getter

    def id(self):
        return "farslip"

    def name(self):
        return "FarSLIP"

    def icon(self):
        return icon()

    def loadAlgorithms(self):
        self.addAlgorithm(SegmentByClassNames(self.manager_getter))
        self.addAlgorithm(TrainOnLabels(self.manager_getter))
        self.addAlgorithm(EvaluateOnLabels(self.manager_getter))
        self.addAlgorithm(SearchBySentences(self.manager_getter))

    def supportedOutputVectorLayerExtensions(self):
        return ["gpkg", "shp", "geojson", "fgb"]

    def supportsNonFileBasedOutput(self):
        return False
