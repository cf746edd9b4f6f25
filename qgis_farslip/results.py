"""Result layers: load the backend's outputs on top of the layer tree, style them, export them."""

from __future__ import annotations

import functools
import json
import os
import zlib
from collections.abc import Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject
from qgis.PyQt.QtGui import QColor
from .classes import resources_dir
from .filenames import first_free
from .i18n import tr

CLASS_FIELD = "class"
CLASS_ID_FIELD = "class_id"
CLASSES_PROPERTY = "farslip/classes"  # the run's classes, [[name, class id], ...] in the order asked for
RASTER_PROPERTY = "farslip/raster"  # the raster file the run segmented: training on its corrections reads it
# The fill lets the imagery show through; the outline keeps each polygon's edge readable.
FILL_ALPHA = 110
OUTLINE_WIDTH_MM = "0.4"
NAME_CLASSES_SHOWN = 3

PALETTE_FILE = "palette.json"


@functools.lru_cache(maxsize=1)
def _palette_file() -> dict:
    """The colour rule shared with the backend's class rasters (resources/palette.json, shipped in the zip)."""
    with open(os.path.join(resources_dir() or "", PALETTE_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def class_colours(names: Sequence[str]) -> dict[str, QColor]:
    """Colours for one run's classes by the palette file's rule: the backend colours its class raster alike.

    A name's keyword group or its hash picks the colour; a colour an earlier class took moves on to the next
    free palette colour, so two classes of a run never share one while the palette lasts.
    """
    rule = _palette_file()
    palette = rule["palette"]
    colours: dict[str, QColor] = {}
    used: list[str] = []
    for name in names:
        lowered = name.lower()
        keyword = (group["colour"] for group in rule["keywords"] if any(word in lowered for word in group["words"]))
        code = next(keyword, None) or palette[zlib.crc32(lowered.encode("utf-8")) % len(palette)]
        if code in used:
            start = palette.index(code) if code in palette else 0
            later = (palette[(start + step) % len(palette)] for step in range(1, len(palette) + 1))
            code = next((free for free in later if free not in used), code)
        used.append(code)
        colours[name] = QColor(code)
    return colours


def result_classes(job: dict) -> list[tuple[str, int]]:
    """(class name, class id) of a finished segment job, in the order they were asked for."""
    classes = (job.get("result") or {}).get("classes") or []
    return [(str(item["class"]), int(item["class_id"])) for item in classes]


def layer_classes(layer: QgsVectorLayer) -> list[tuple[str, int]]:
    """(class name, class id) of a result layer in its run's order: the colours of its style depend on it.

    From the classes the run reported (kept on the layer), else from the layer's class ids; a layer
    without class ids gets its class names in alphabetical order.
    """
    stored = layer.customProperty(CLASSES_PROPERTY)
    if stored:
        try:
            return [(str(name), int(class_id)) for name, class_id in json.loads(stored)]
        except (TypeError, ValueError):
            pass
    has_ids = layer.fields().indexOf(CLASS_ID_FIELD) >= 0
    found: dict[str, int | None] = {}
    for feature in layer.dataProvider().getFeatures():
        class_id = feature[CLASS_ID_FIELD] if has_ids else None
        found.setdefault(str(feature[CLASS_FIELD]), int(class_id) if isinstance(class_id, int) else None)
    if found and all(class_id is not None for class_id in found.values()):
        return sorted(found.items(), key=lambda item: item[1])
    return [(name, index) for index, name in enumerate(sorted(found))]


def class_symbol(colour: QColor) -> QgsFillSymbol:
    """A semi-transparent fill in the class colour with an opaque, darker outline of the same hue."""
    fill = QColor(colour)
    fill.setAlpha(FILL_ALPHA)
    outline = colour.darker(130)
    return QgsFillSymbol.createSimple({
        "color": ",".join(str(part) for part in (fill.red(), fill.green(), fill.blue(), fill.alpha())),
        "outline_color": outline.name(), "outline_width": OUTLINE_WIDTH_MM, "outline_width_unit": "MM"})


def categorized_renderer(classes: Sequence[tuple[str, int]]) -> QgsCategorizedSymbolRenderer:
    colours = class_colours([name for name, _ in classes])
    categories = [QgsRendererCategory(name, class_symbol(colours[name]), name) for name, _class_id in classes]
    return QgsCategorizedSymbolRenderer(CLASS_FIELD, categories)


def result_name(preset: str | None, class_names: Sequence[str], when: str) -> str:
    """'landcover 14:05:31' or 'water, grass, road +2 14:05:31': what was asked for, and when."""
    if preset:
        label = preset
    else:
        label = ", ".join(class_names[:NAME_CLASSES_SHOWN])
        if len(class_names) > NAME_CLASSES_SHOWN:
            label += f" +{len(class_names) - NAME_CLASSES_SHOWN}"
    return f"{label or 'FarSLIP'} {when}"


def unique_result_name(name: str, project: QgsProject) -> str:
    """`name`, or `name (2)`, `name (3)`...: a name no layer of the project has (two runs in the same second,
    or results of one preset at the same time of day on two days, are told apart in the layer tree, the Export
    dialog and the tables an export writes)."""
    taken = {layer.name() for layer in project.mapLayers().values()}
    return first_free(name, taken.__contains__, lambda number: f"{name} ({number})")


def probability_renderer(layer: QgsRasterLayer, band: int, colour: QColor) -> QgsSingleBandPseudoColorRenderer:
    """One class's probability (0-1) as a pseudocolour ramp, transparent at 0, the class colour at 1."""
    clear = QColor(colour)
    clear.setAlpha(0)
    ramp = QgsGradientColorRamp(clear, QColor(colour))
    shader_function = QgsColorRampShader(0.0, 1.0, ramp)
    shader_function.classifyColorRamp(5, band)
    shader = QgsRasterShader(0.0, 1.0)
    shader.setRasterShaderFunction(shader_function)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    return renderer


def style_probability_layer(layer: QgsRasterLayer, class_name: str, classes: Sequence[tuple[str, int]]) -> None:
    """Show the band of `class_name` (bands are in the order the classes were asked for)."""
    names = [name for name, _ in classes]
    if class_name not in names:
        raise ValueError(f"{class_name!r} is not one of the classes of {layer.name()}.")
    colours = class_colours(names)
    layer.setRenderer(probability_renderer(layer, names.index(class_name) + 1, colours[class_name]))
    layer.setCustomProperty("farslip/probability_class", class_name)
    layer.triggerRepaint()


def paletted_renderer(layer: QgsRasterLayer, classes: Sequence[tuple[str, int]]) -> QgsPalettedRasterRenderer:
    colours = class_colours([name for name, _ in classes])
    entries = [QgsPalettedRasterRenderer.Class(class_id, colours[name], name) for name, class_id in classes]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries)


RESULTS_GROUP = "FarSLIP results"


def results_group(project: QgsProject) -> QgsLayerTreeGroup:
    """The "FarSLIP results" group at the top of the layer tree (created there the first time)."""
    root = project.layerTreeRoot()
    group = root.findGroup(RESULTS_GROUP)
    if group is None:
        group = root.insertGroup(0, RESULTS_GROUP)
    return group


def add_on_top(layer: QgsMapLayer, project: QgsProject) -> None:
    """Add `layer` as the first (top) layer of the results group, so the newest result is drawn above all."""
    project.addMapLayer(layer, False)
    group = results_group(project)
    group.insertLayer(0, layer)
    group.setItemVisibilityChecked(True)
    # A new group is shown collapsed by the layer tree view until its expanded state changes: open it.
    group.setExpanded(False)
    group.setExpanded(True)


def load_segment_result(job: dict, name: str, project: QgsProject | None = None) -> list[QgsMapLayer]:
    """Add the vector (and the optional rasters) of a finished job on top; return them, top first."""
    project = project or QgsProject.instance()
    name = unique_result_name(name, project)
    outputs = (job.get("result") or {}).get("outputs") or {}
    classes = result_classes(job)
    vector_path = outputs.get("vector")
    if not vector_path or not os.path.isfile(vector_path):
        raise RuntimeError(tr("The backend reported success but its output {} is missing.").format(vector_path))
    # A GeoPackage may hold other layers besides the result (the backend keeps them): open the result's own.
    layer_name = (job.get("result") or {}).get("layer")
    source = f"{vector_path}|layername={layer_name}" if layer_name and vector_path.lower().endswith(".gpkg") \
        else vector_path
    vector = QgsVectorLayer(source, name, "ogr")
    if not vector.isValid():
        raise RuntimeError(tr("QGIS cannot open the result {}.").format(vector_path))
    raster_path = str((job.get("request") or {}).get("raster") or "")
    added: list[QgsMapLayer] = []
    coarse_path = outputs.get("coarse_vector")
    if coarse_path and os.path.isfile(coarse_path):
        # Refined outlines were asked for: the unrefined ones go just below them, to compare.
        coarse = QgsVectorLayer(coarse_path, f"{name} {tr('coarse')}", "ogr")
        if coarse.isValid():
            if classes:
                coarse.setRenderer(categorized_renderer(classes))
                coarse.setCustomProperty(CLASSES_PROPERTY, json.dumps(classes))
            coarse.setCustomProperty("farslip/kind", "coarse_vector")
            coarse.setCustomProperty(RASTER_PROPERTY, raster_path)
            add_on_top(coarse, project)
            added.insert(0, coarse)
    for key, title in (("prob_raster", tr("probabilities")), ("class_raster", tr("classes"))):
        path = outputs.get(key)
        if path and os.path.isfile(path):
            raster = QgsRasterLayer(path, f"{name} {title}")
            if raster.isValid():
                if key == "class_raster" and classes:
                    raster.setRenderer(paletted_renderer(raster, classes))
                elif classes:
                    style_probability_layer(raster, classes[0][0], classes)
                    raster.setCustomProperty(CLASSES_PROPERTY, json.dumps(classes))  # its bands, for a reopening
                raster.setCustomProperty("farslip/kind", key)
                add_on_top(raster, project)
                added.insert(0, raster)
    if classes:
        vector.setRenderer(categorized_renderer(classes))
        vector.setCustomProperty(CLASSES_PROPERTY, json.dumps(classes))
    vector.setCustomProperty("farslip/run_id", (job.get("result") or {}).get("run_id") or "")
    vector.setCustomProperty("farslip/job_id", job.get("id") or "")
    vector.setCustomProperty("farslip/kind", "vector")
    vector.setCustomProperty(RASTER_PROPERTY, raster_path)
    add_on_top(vector, project)
    added.insert(0, vector)
    return added


class ProbabilityChoice(QObject):
    """The "Show probability of" combo: which class band the latest probability raster shows."""

    def __init__(self, combo, parent=None):
        super().__init__(parent)
        self.combo = combo
        self.layer: QgsRasterLayer | None = None
        self.classes: list[tuple[str, int]] = []
        combo.currentTextChanged.connect(self._chosen)

    def offer(self, layers: Sequence[QgsMapLayer], classes: Sequence[tuple[str, int]]) -> None:
        self.layer = next((layer for layer in layers if isinstance(layer, QgsRasterLayer)
                           and layer.customProperty("farslip/kind") == "prob_raster"), None)
        self.classes = list(classes)
        self.combo.blockSignals(True)
        self.combo.clear()
        if self.layer is not None:
            self.combo.addItems([name for name, _ in self.classes])
            shown = self.combo.findText(str(self.layer.customProperty("farslip/probability_class") or ""))
            self.combo.setCurrentIndex(max(shown, 0))
        self.combo.blockSignals(False)
        self.combo.setEnabled(self.combo.count() > 0)

    def forget(self, layer_ids: Sequence[str]) -> None:
        """The probability raster is being removed (or the project closed): the combo offers nothing."""
        if self.layer is not None and (sip.isdeleted(self.layer) or self.layer.id() in layer_ids):
            self.offer([], [])

    def adopt(self, layers: Sequence[QgsMapLayer]) -> None:
        """Layers added (a project opened): with no probability raster offered, that of a FarSLIP run among
        them is, its classes from the run, the one it shows chosen."""
        if self.layer is not None and not sip.isdeleted(self.layer):
            return
        for layer in layers:
            if not isinstance(layer, QgsRasterLayer) or layer.customProperty("farslip/kind") != "prob_raster":
                continue
            try:
                classes = [(str(name), int(class_id))
                           for name, class_id in json.loads(layer.customProperty(CLASSES_PROPERTY) or "[]")]
            except (TypeError, ValueError):
                continue
            if classes and layer.isValid():
                self.offer([layer], classes)
                return

    def _chosen(self, name: str) -> None:
        if self.layer is not None and not sip.isdeleted(self.layer) and name:
            style_probability_layer(self.layer, name, self.classes)
