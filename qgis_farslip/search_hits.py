"""The hits layer of a search: rectangles labelled by rank and coloured by score."""

from __future__ import annotations

import os

from qgis.core import (
    QgsClassificationEqualInterval,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGraduatedSymbolRenderer,
    QgsMapLayer,
    QgsPalLayerSettings,
    QgsProject,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from .results import add_on_top

SCORE_CLASSES = 5


def score_renderer(layer: QgsVectorLayer) -> QgsGraduatedSymbolRenderer:
    """Outlines from pale yellow (lower scores) to dark red (best), so the raster stays visible."""
    renderer = QgsGraduatedSymbolRenderer("score")
    renderer.setSourceSymbol(QgsFillSymbol.createSimple({"style": "no", "outline_width": "0.8"}))
    classes = min(SCORE_CLASSES, max(1, layer.featureCount()))
    # Not updateClasses(layer, mode, classes): deprecated since QGIS 3.10 (its Mode enum with it).
    renderer.setClassificationMethod(QgsClassificationEqualInterval())
    renderer.updateClasses(layer, classes)
    renderer.updateColorRamp(QgsGradientColorRamp(QColor("#ffffb2"), QColor("#bd0026")))
    for index, score_range in enumerate(renderer.ranges()):
        symbol = score_range.symbol().clone()
        symbol.symbolLayer(0).setStrokeColor(symbol.color())
        renderer.updateRangeSymbol(index, symbol)
    return renderer


def rank_labels() -> QgsVectorLayerSimpleLabeling:
    settings = QgsPalLayerSettings()
    settings.fieldName = "rank"
    text = QgsTextFormat()
    text.setSize(10)
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setColor(QColor("white"))
    text.setBuffer(buffer)
    settings.setFormat(text)
    return QgsVectorLayerSimpleLabeling(settings)


def load_hits(job: dict, raster_layer: QgsMapLayer | None, name: str,
              project: QgsProject | None = None) -> QgsVectorLayer:
    """Add a finished search job's hits layer above the raster, labelled by rank and styled by score."""
    project = project or QgsProject.instance()
    result = job.get("result") or {}
    path = (result.get("outputs") or {}).get("vector")
    if not path or not os.path.isfile(path):
        raise RuntimeError(f"The backend reported success but its hits file {path} is missing.")
    layer = QgsVectorLayer(path, name, "ogr")
    if not layer.isValid():
        raise RuntimeError(f"QGIS cannot open the hits file {path}.")
    if layer.featureCount() > 0:
        layer.setRenderer(score_renderer(layer))
    layer.setLabeling(rank_labels())
    layer.setLabelsEnabled(True)
    layer.setCustomProperty("farslip/run_id", result.get("run_id") or "")
    layer.setCustomProperty("farslip/job_id", job.get("id") or "")
    add_on_top(layer, project)  # on top of the layer tree, like every FarSLIP result
    return layer
