"""A map tool to draw the rectangle to segment."""

from __future__ import annotations

from qgis.core import QgsPointXY, QgsRectangle, QgsWkbTypes
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor


class RectangleMapTool(QgsMapTool):
    """Press, drag, release: emits the rectangle in the canvas's CRS."""

    extentDrawn = pyqtSignal(QgsRectangle)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.start = None
        self.rubber_band = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self.rubber_band.setColor(QColor(255, 120, 0, 200))
        self.rubber_band.setFillColor(QColor(255, 120, 0, 40))
        self.rubber_band.setWidth(2)
        self.setCursor(Qt.CursorShape.CrossCursor)

    def canvasPressEvent(self, event):
        self.start = self.toMapCoordinates(event.pos())
        self.show_rectangle(QgsRectangle(self.start, self.start))

    def canvasMoveEvent(self, event):
        if self.start is not None:
            self.show_rectangle(QgsRectangle(self.start, self.toMapCoordinates(event.pos())))

    def canvasReleaseEvent(self, event):
        if self.start is None:
            return
        rectangle = QgsRectangle(self.start, self.toMapCoordinates(event.pos()))
        self.start = None
        if rectangle.width() > 0 and rectangle.height() > 0:
            self.show_rectangle(rectangle)
            self.extentDrawn.emit(rectangle)

    def show_rectangle(self, rectangle: QgsRectangle) -> None:
        self.rubber_band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
        corners = [QgsPointXY(rectangle.xMinimum(), rectangle.yMinimum()),
                   QgsPointXY(rectangle.xMaximum(), rectangle.yMinimum()),
                   QgsPointXY(rectangle.xMaximum(), rectangle.yMaximum()),
                   QgsPointXY(rectangle.xMinimum(), rectangle.yMaximum())]
        for index, corner in enumerate(corners):
            self.rubber_band.addPoint(corner, index == len(corners) - 1)
        self.rubber_band.show()

    def clear(self) -> None:
        self.rubber_band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)
