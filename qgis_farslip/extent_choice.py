"""The dock's extent row: map canvas, whole layer, or a rectangle drawn on the map, in any CRS."""

from __future__ import annotations

from qgis.core import QgsCoordinateReferenceSystem, QgsCsException, QgsRasterLayer, QgsRectangle
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject

from .extent import PixelWindow, transform_extent
from .map_tool import RectangleMapTool
from .i18n import tr

EXTENT_CANVAS, EXTENT_LAYER, EXTENT_DRAWN = "canvas", "layer", "drawn"


class ExtentError(ValueError):
    """The extent cannot be used; the message says what to do."""


def unusable_extent_text(layer_name: str) -> str:
    """The sentence for an extent that cannot be taken into the raster's CRS (an empty map, a view beyond the
    CRS's area of use)."""
    return tr("The map's extent cannot be taken into the CRS of the raster {} (the map shows nothing yet, or a "
              "view beyond that CRS's area of use); zoom to the raster or choose 'Whole layer'.").format(layer_name)


def clipped_to_layer(rectangle: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer
                     ) -> QgsRectangle:
    """`rectangle` (in `crs`) in the raster layer's CRS, clipped to the layer: an empty rectangle where it misses
    the raster, ExtentError (`unusable_extent_text`) where it has no image in that CRS."""
    try:
        clipped = transform_extent(rectangle, crs, layer.crs()).intersect(layer.extent())
    except QgsCsException:
        raise ExtentError(unusable_extent_text(layer.name())) from None
    return clipped if clipped.width() > 0 and clipped.height() > 0 else QgsRectangle()


def overlapping_part(rectangle: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer
                     ) -> QgsRectangle:
    """The part of `rectangle` (in `crs`) on the raster, in the raster's CRS; ExtentError where there is none."""
    clipped = clipped_to_layer(rectangle, crs, layer)
    if clipped.isEmpty():
        raise ExtentError(tr("The chosen extent does not overlap the raster {}; pan the map to the raster or choose "
                             "'Whole layer'.").format(layer.name()))
    return clipped


class ExtentChoice(QObject):
    def __init__(self, iface, combo, draw_button, parent=None):
        super().__init__(parent)
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.combo = combo
        self.drawn: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None
        # The raster (its layer id) and window of its pixels the drawn rectangle is the envelope of, if it is one.
        self.drawn_window: tuple[str, PixelWindow] | None = None
        self.map_tool = RectangleMapTool(self.canvas)
        self.map_tool.extentDrawn.connect(self._drawn)
        self._previous_tool = None
        combo.addItem(tr("Map canvas"), EXTENT_CANVAS)
        combo.addItem(tr("Whole layer"), EXTENT_LAYER)
        combo.addItem(tr("Drawn rectangle"), EXTENT_DRAWN)
        draw_button.clicked.connect(self.start_drawing)

    def start_drawing(self) -> None:
        self.combo.setCurrentIndex(self.combo.findData(EXTENT_DRAWN))
        self._previous_tool = self.canvas.mapTool()
        self.canvas.setMapTool(self.map_tool)

    def _drawn(self, rectangle: QgsRectangle) -> None:
        self.set_drawn(rectangle, self.canvas.mapSettings().destinationCrs())
        # Hand the map back to the tool the user had (pan, identify...), never leave it without one.
        previous = self._previous_tool
        if previous is not None and not sip.isdeleted(previous) and previous is not self.map_tool:
            self.canvas.setMapTool(previous)
        else:
            self.canvas.unsetMapTool(self.map_tool)
            self.iface.actionPan().trigger()

    def set_drawn(self, rectangle: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                  window: tuple[QgsRasterLayer, PixelWindow] | None = None) -> None:
        self.drawn = (QgsRectangle(rectangle), crs)
        self.drawn_window = (window[0].id(), window[1]) if window is not None else None
        self.combo.setCurrentIndex(self.combo.findData(EXTENT_DRAWN))

    def chosen(self) -> tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None:
        """The extent to segment and its CRS; None means the whole layer."""
        choice = self.combo.currentData()
        if choice == EXTENT_LAYER:
            return None
        if choice == EXTENT_DRAWN:
            if self.drawn is None:
                raise ExtentError(tr("Draw the rectangle to segment on the map first (the Draw button)."))
            return self.drawn
        return self.canvas.extent(), self.canvas.mapSettings().destinationCrs()

    def pixel_window(self, layer: QgsRasterLayer) -> PixelWindow | None:
        """The window of `layer`'s pixels to segment instead of the chosen rectangle: a search hit's on that
        raster, while the drawn rectangle is the hit's and is chosen."""
        if self.drawn_window is None or self.combo.currentData() != EXTENT_DRAWN:
            return None
        layer_id, window = self.drawn_window
        return window if layer.id() == layer_id else None

    def in_layer_crs(self, layer: QgsRasterLayer) -> QgsRectangle:
        """The chosen extent as the raster's CRS sees it, clipped to the raster."""
        chosen = self.chosen()
        if chosen is None:
            return layer.extent()
        return overlapping_part(*chosen, layer)

    def close_down(self) -> None:
        if self.canvas.mapTool() is self.map_tool:
            self.canvas.unsetMapTool(self.map_tool)
        self.map_tool.clear()
