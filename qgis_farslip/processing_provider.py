"""Processing provider: "Segment raster by class names", for batch mode and the graphical modeler."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterExtent,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingProvider,
)
from qgis.PyQt.QtGui import QIcon

from .backend_manager import BackendManager
from .classes import parse_class_text, resources_dir
from .client import BackendClient, BackendError
from .extent import crs_text, export_size, local_raster_path, write_geotiff
from .jobs import JobCancelled, run_job
from .results import categorized_renderer

# Post-processors must outlive processAlgorithm; QGIS calls them after the run, in the GUI thread.
_POST_PROCESSORS: list[StyleResult] = []


def icon() -> QIcon:
    root = resources_dir()
    return QIcon(os.path.join(root, "icons", "farslip.svg")) if root else QIcon()


class StyleResult(QgsProcessingLayerPostProcessorInterface):
    def __init__(self, classes: list[tuple[str, int]]):
        super().__init__()
        self.classes = classes

    def postProcessLayer(self, layer, context, feedback):
        if layer is not None and layer.isValid() and self.classes:
            layer.setRenderer(categorized_renderer(self.classes))
            layer.triggerRepaint()


class SegmentByClassNames(QgsProcessingAlgorithm):
    INPUT, EXTENT, CLASSES, MODEL, THRESHOLD, OUTPUT = "INPUT", "EXTENT", "CLASSES", "MODEL", "THRESHOLD", "OUTPUT"

    def __init__(self, manager_getter: Callable[[], BackendManager | None]):
        super().__init__()
        self.manager_getter = manager_getter

    def createInstance(self):
        return SegmentByClassNames(self.manager_getter)

    def name(self):
        return "segment_by_class_names"

    def displayName(self):
        return "Segment raster by class names"

    def shortHelpString(self):
        return ("Open-vocabulary segmentation with FarSLIP: type the classes, one per line (commas separate "
                "synonyms, e.g. 'road, parking lot'), and get a polygon layer with the fields class, "
                "class_id, score_mean, score_max and area_m2, in the raster's CRS. The FarSLIP backend runs "
                "in its own process; the plugin starts it when needed.")

    def icon(self):
        return icon()

    def initAlgorithm(self, config=None):
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, "Raster layer"))
        self.addParameter(QgsProcessingParameterExtent(self.EXTENT, "Extent (default: the whole raster)",
                                                       optional=True))
        self.addParameter(QgsProcessingParameterString(self.CLASSES, "Classes, one per line", multiLine=True))
        self.addParameter(QgsProcessingParameterString(
            self.MODEL, "Model (name, checkpoint file or fine-tuned model folder; empty: the default)",
            optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, "Score threshold (pixels below it stay unclassified)",
            QgsProcessingParameterNumber.Double, 0.0, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, "Segmented polygons", QgsProcessing.TypeVectorPolygon))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("The raster layer cannot be opened.")
        class_lines = parse_class_text(self.parameterAsString(parameters, self.CLASSES, context))
        if not class_lines:
            raise QgsProcessingException("Give at least one class name (one per line).")
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        request: dict = {"class_lines": class_lines,
                         "model": self.parameterAsString(parameters, self.MODEL, context).strip() or None,
                         "threshold": self.parameterAsDouble(parameters, self.THRESHOLD, context),
                         "out": out, "overwrite": True}

        extent = None
        if parameters.get(self.EXTENT):
            extent = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs()).intersect(layer.extent())
            if extent.isEmpty():
                raise QgsProcessingException(f"The extent does not overlap the raster {layer.name()}.")
        path = local_raster_path(layer)
        if path is None:
            # A WMS/XYZ/virtual layer: the backend reads files, so write the extent to a GeoTIFF first.
            extent = extent or layer.extent()
            size = export_size(layer, extent, extent, (2048, 2048))
            path = os.path.join(tempfile.mkdtemp(prefix="farslip-"), "raster.tif")
            feedback.pushInfo(f"Writing {layer.name()} ({size[0]} x {size[1]} px) to {path}")
            write_geotiff(layer.dataProvider().clone(), extent, size, layer.crs(), path)
        elif extent is not None:
            request["bbox"] = [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]
            request["bbox_crs"] = crs_text(layer.crs())
        request["raster"] = path

        manager = self.manager_getter()
        if manager is None:
            raise QgsProcessingException("The FarSLIP plugin is not loaded.")
        try:
            connection = manager.wait_ready(should_cancel=feedback.isCanceled)
            feedback.pushInfo(f"FarSLIP backend at {connection.url}")

            def on_update(job):
                feedback.setProgress(100.0 * float(job.get("progress") or 0.0))
                if job.get("message"):
                    feedback.setProgressText(job["message"])

            job = run_job(BackendClient(connection), "segment", request, on_update, feedback.isCanceled, [out])
        except JobCancelled:
            raise QgsProcessingException("Cancelled; nothing was written.") from None
        except BackendError as error:
            raise QgsProcessingException(str(error)) from None

        classes = [(str(item["class"]), int(item["class_id"])) for item in (job.get("result") or {}).get("classes", [])]
        for item in (job.get("result") or {}).get("classes", []):
            feedback.pushInfo(f"{item['class']}: {item['polygons']} polygons, {item['area_m2']:.0f} m²")
        if context.willLoadLayerOnCompletion(out):
            post_processor = StyleResult(classes)
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

    def supportedOutputVectorLayerExtensions(self):
        return ["gpkg", "shp", "geojson", "fgb"]

    def supportsNonFileBasedOutput(self):
        return False
