"""Result layers: load the backend's outputs above the raster, style them, export them."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

CLASS_FIELD = "class"

# Colours people expect for common land-cover words; anything else gets a palette colour from its name.
KEYWORD_COLOURS = (
    (("water", "lake", "river", "sea", "pond", "reservoir"), "#1f78b4"),
    (("tree", "forest", "wood"), "#1b7837"),
    (("grass", "meadow", "lawn", "pasture", "vegetation", "low_vegetation"), "#7fbc41"),
    (("crop", "farm", "agricultur", "field", "cultivated"), "#e6c229"),
    (("building", "roof", "house"), "#d7301f"),
    (("road", "street", "parking", "pavement", "impervious", "highway"), "#737373"),
    (("bare", "soil", "sand", "barren"), "#c49a6c"),
    (("car", "vehicle"), "#ff00ff"),
    (("background", "clutter", "other"), "#bdbdbd"),
)
PALETTE = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#66c2a5",
           "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854", "#ffd92f", "#e5c494", "#1b9e77", "#d95f02",
           "#7570b3", "#e7298a", "#66a61e", "#e6ab02")


def class_colour(name: str) -> QColor:
    """The same colour for the same class name in every run and every project."""
    lowered = name.lower()
    for words, colour in KEYWORD_COLOURS:
        if any(word in lowered for word in words):
            return QColor(colour)
    return QColor(PALETTE[zlib.crc32(lowered.encode("utf-8")) % len(PALETTE)])


def class_colours(names: Sequence[str]) -> dict[str, QColor]:
    """Colours for one run's classes; two classes never share a colour (later ones move on)."""
    colours, used = {}, set()
    for name in names:
        colour = class_colour(name)
        if colour.name() in used:
            start = PALETTE.index(colour.name()) if colour.name() in PALETTE else 0
            free = [PALETTE[(start + step) % len(PALETTE)] for step in range(1, len(PALETTE) + 1)]
            colour = QColor(next((c for c in free if c not in used), colour.name()))
        used.add(colour.name())
        colours[name] = colour
    return colours


def result_classes(job: dict) -> list[tuple[str, int]]:
    """(class name, class id) of a finished segment job, in the order they were asked for."""
    classes = (job.get("result") or {}).get("classes") or []
    return [(str(item["class"]), int(item["class_id"])) for item in classes]


def categorized_renderer(classes: Sequence[tuple[str, int]]) -> QgsCategorizedSymbolRenderer:
    colours = class_colours([name for name, _ in classes])
    categories = []
    for name, _class_id in classes:
        symbol = QgsFillSymbol.createSimple({"color": colours[name].name(), "outline_color": "35,35,35,180",
                                             "outline_width": "0.1"})
        categories.append(QgsRendererCategory(name, symbol, name))
    return QgsCategorizedSymbolRenderer(CLASS_FIELD, categories)


def paletted_renderer(layer: QgsRasterLayer, classes: Sequence[tuple[str, int]]) -> QgsPalettedRasterRenderer:
    colours = class_colours([name for name, _ in classes])
    entries = [QgsPalettedRasterRenderer.Class(class_id, colours[name], name) for name, class_id in classes]
    return QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries)


def _insert_above(layer: QgsMapLayer, anchor: QgsMapLayer | None, project: QgsProject) -> None:
    """Add `layer` to the project directly above `anchor` in the layer tree (on top if no anchor)."""
    project.addMapLayer(layer, False)
    root = project.layerTreeRoot()
    node = root.findLayer(anchor.id()) if anchor is not None else None
    parent = node.parent() if node is not None else root
    if not isinstance(parent, QgsLayerTreeGroup):
        parent = root
    index = parent.children().index(node) if node is not None else 0
    parent.insertLayer(index, layer)


def load_segment_result(job: dict, raster_layer: QgsMapLayer | None, name: str,
                        project: QgsProject | None = None) -> list[QgsMapLayer]:
    """Add the vector (and the optional rasters) of a finished job above the raster; return them, top first."""
    project = project or QgsProject.instance()
    outputs = (job.get("result") or {}).get("outputs") or {}
    classes = result_classes(job)
    added: list[QgsMapLayer] = []
    for key, title in (("prob_raster", "probabilities"), ("class_raster", "classes")):
        path = outputs.get(key)
        if path and os.path.isfile(path):
            raster = QgsRasterLayer(path, f"{name} {title}")
            if raster.isValid():
                if key == "class_raster" and classes:
                    raster.setRenderer(paletted_renderer(raster, classes))
                _insert_above(raster, raster_layer, project)
                added.insert(0, raster)
    vector_path = outputs.get("vector")
    if not vector_path or not os.path.isfile(vector_path):
        raise RuntimeError(f"The backend reported success but its output {vector_path} is missing.")
    vector = QgsVectorLayer(vector_path, name, "ogr")
    if not vector.isValid():
        raise RuntimeError(f"QGIS cannot open the result {vector_path}.")
    if classes:
        vector.setRenderer(categorized_renderer(classes))
    vector.setCustomProperty("farslip/run_id", (job.get("result") or {}).get("run_id") or "")
    vector.setCustomProperty("farslip/job_id", job.get("id") or "")
    _insert_above(vector, added[-1] if added else raster_layer, project)
    added.insert(0, vector)
    return added


def driver_for(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    drivers = {".shp": "ESRI Shapefile", ".gpkg": "GPKG", ".geojson": "GeoJSON", ".fgb": "FlatGeobuf"}
    if extension not in drivers:
        raise ValueError(f"Cannot export to {path}: choose a .shp or .gpkg file.")
    return drivers[extension]


def export_vector_layer(layer: QgsVectorLayer, path: str) -> str:
    """Write the layer as a shapefile or GeoPackage (by the file's extension), in its own CRS."""
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = driver_for(path)
    options.fileEncoding = "UTF-8"
    options.layerName = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), options)
    if error != QgsVectorFileWriter.NoError:
        raise RuntimeError(f"Export to {path} failed: {message}")
    return path
