"""The dock's Search tab: find places in a raster by sentence or by example, list and zoom to the hits."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsMapLayerProxyModel,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.gui import QgsMapToolEmitPoint
from qgis.PyQt import sip, uic
from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QListWidgetItem, QWidget

from .backend_manager import log
from .extent import (crs_text, displayed_bands, gdal_dataset_name, hit_window, local_raster_path, unusable_layer_text,
                     transform_extent, vrt_step)
from .extent_choice import ExtentError, overlapping_part
from .filenames import safe_file_stem, unused_stem
from .jobs import CANCEL_TOO_LATE, JobTask, eta_text
from .search_hits import load_hits
from .settings import PluginSettings

FORM, _ = uic.loadUiType(os.path.join(os.path.dirname(__file__), "ui", "search_tab.ui"))
EXTENT_LAYER, EXTENT_CANVAS = "layer", "canvas"
HIT_BOUNDS = Qt.ItemDataRole.UserRole
HIT_FOOTPRINT = Qt.ItemDataRole.UserRole + 1  # the hit's window on the ground: its corners in the raster's CRS


class UserError(ValueError):
    """Something the user can fix in the Search tab; the message says what."""


def hit_text(hit: dict) -> str:
    """'1.  0.312  1120 m  a lake next to a road' for the hits list."""
    return f"{hit['rank']}.  {hit['score']:.3f}  {hit['scale_m']:g} m  {hit['query']}"


class SearchTab(QObject):
    searchFinished = pyqtSignal(str)  # "done", "failed" or "cancelled"

    def __init__(self, dock, settings_loader: Callable[[], PluginSettings] = PluginSettings.load):
        super().__init__(dock)
        self.dock = dock
        self.canvas = dock.canvas
        self.settings_loader = settings_loader
        self.page = QWidget()
        self.form = FORM()
        self.form.setupUi(self.page)
        dock.form.tabs.addTab(self.page, "Search")
        self.task: JobTask | None = None
        self.hits_layer = None
        # The CRS of the hits' coordinates: the raster's as the backend read it, which is the layer's CRS (a CRS set
        # in QGIS included: the layer's VRT carries it), kept when the search finishes: the user may remove the hits
        # layer. Set before the hits are listed, so it is the CRS of every hit in the list.
        self.hits_crs = QgsCoordinateReferenceSystem()
        self.raster_layer: QgsRasterLayer | None = None  # the raster of the hits listed
        self.searching: QgsRasterLayer | None = None  # the raster of the search running (or last run)
        self.searching_name = ""  # its name when the search was sent: the layer may be removed while it runs
        self.searching_project = 0  # the dock's project_generation when the search was sent
        self.last_error = ""
        form = self.form
        form.searchRasterCombo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        form.searchExtentCombo.addItem("Whole layer", EXTENT_LAYER)
        form.searchExtentCombo.addItem("Map canvas", EXTENT_CANVAS)
        self.point_tool = QgsMapToolEmitPoint(self.canvas)
        self.point_tool.canvasClicked.connect(self._example_clicked)
        form.searchButton.clicked.connect(lambda: self.search())
        form.likeButton.toggled.connect(self._like_toggled)
        form.searchCancelButton.clicked.connect(self.cancel)
        form.hitsList.itemClicked.connect(self.zoom_to_hit)
        form.hitsList.currentItemChanged.connect(lambda item, _old: form.useHitButton.setEnabled(item is not None))
        form.useHitButton.clicked.connect(self.use_hit_as_extent)

    # -- requests ------------------------------------------------------------------------------
    def sentences(self) -> list[str]:
        return [line.strip() for line in self.form.sentencesEdit.toPlainText().splitlines() if line.strip()]

    def build_request(self, like: tuple[float, float, QgsCoordinateReferenceSystem] | None = None
                      ) -> tuple[dict[str, Any], Callable | None, str]:
        """The POST /v1/search body, a preparation step for a layer the backend cannot read as is, and the hits
        file it writes.

        A GDAL layer that is not a plain file (a GeoPackage table, a zipped file) or whose CRS was set in QGIS is
        searched through its kept VRT, as segmenting reads it: the same file on every search, so the backend's
        search index knows it again, and in the layer's CRS, so the hits lie where QGIS shows the raster."""
        layer = self.form.searchRasterCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
            raise UserError("Choose a raster layer to search.")
        unusable = unusable_layer_text(layer)
        if unusable:
            raise UserError(unusable)
        path = local_raster_path(layer)
        prepare = None
        if path is None:
            if gdal_dataset_name(layer) is None:
                raise UserError(f"{layer.name()} is not a raster GDAL reads (a WMS, XYZ or other web layer, a "
                                "database or virtual raster), so the backend cannot index it; save the part to "
                                "search as a GeoTIFF (Export > Save As...) and search that.")
            prepare = vrt_step(layer)  # names the VRT as the request's raster
        sentences = self.sentences()
        if not sentences and like is None:
            raise UserError("Type a sentence to search for (one per line), or use 'Like this place...' and "
                            "click the map.")
        keywords = self.form.keywordsEdit.text().strip()
        if keywords and len(sentences) != 1:
            raise UserError("Keywords go with a single sentence; with several sentences leave them empty "
                            "(each sentence is split into keywords automatically).")
        folder = self.settings_loader().output_dir()
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise UserError(f"The output folder {folder} cannot be created ({error.strerror}); choose another "
                            "one in the FarSLIP settings.") from None
        name = safe_file_stem(layer.name(), fallback="raster")
        out = unused_stem(folder, f"{name}_hits_{time.strftime('%Y%m%d-%H%M%S')}") + ".gpkg"
        request: dict[str, Any] = {"raster": path, "sentences": sentences if like is None else [],
                                   "top": int(self.form.topSpin.value()), "model": self.dock.model_name(),
                                   "out": out}
        if keywords and like is None:
            request["keywords"] = [keywords]
        bands = displayed_bands(layer)  # the index is of the colours the analyst sees (bands are part of its key)
        if bands:
            request["bands"] = bands
        if self.form.searchExtentCombo.currentData() == EXTENT_CANVAS:
            extent, crs = self.canvas.extent(), self.canvas.mapSettings().destinationCrs()
            try:  # a view off the raster is refused as the Segment tab refuses it
                on_raster = overlapping_part(extent, crs, layer)
            except ExtentError as error:
                raise UserError(str(error)) from None
            # The part on the raster, in its CRS, as the Segment tab sends it: a map zoomed out beyond the CRS's
            # range (an EPSG:4326 canvas from -315 to 315) still means this raster.
            request["bbox"] = [on_raster.xMinimum(), on_raster.yMinimum(), on_raster.xMaximum(), on_raster.yMaximum()]
            request["bbox_crs"] = crs_text(layer.crs())
        if like is not None:
            x, y, crs = like
            if not clicked_on_layer(QgsPointXY(x, y), crs, layer):  # said in the map's words, not the raster file's
                raise UserError(f"The clicked place lies outside the raster {layer.name()}; click on the raster, "
                                "or choose the layer to search there.")
            request["like"] = [x, y]
            request["like_crs"] = crs_text(crs)
        return request, prepare, out

    # -- running -------------------------------------------------------------------------------
    def search(self, like: tuple[float, float, QgsCoordinateReferenceSystem] | None = None) -> None:
        if self.task is not None:
            return
        self.last_error = ""
        try:
            request, prepare, _out = self.build_request(like)
        except UserError as error:
            self._show(str(error), error=True)
            self.searchFinished.emit("failed")
            return
        if self.dock.manager.state != "ready" or self.dock.manager.connection is None:
            self._show("The FarSLIP backend is not connected; press Connect below.", error=True)
            self.dock.manager.ensure()
            self.searchFinished.emit("failed")
            return
        self.searching = self.form.searchRasterCombo.currentLayer()
        self.searching_name = self.searching.name()
        self.searching_project = self.dock.project_generation  # its hits belong to this project
        task = JobTask(f"FarSLIP: searching {self.searching_name}", self.dock.manager.connection, "search",
                       request, prepare)
        task.jobUpdated.connect(self._job_updated)
        task.backendLost.connect(self.dock.manager.lost)
        task.succeeded.connect(self._job_done)
        task.failedWith.connect(self._job_failed)
        task.cancelledJob.connect(self._job_cancelled)
        self.task = task
        self._set_running(True)
        self.form.searchProgressBar.setValue(0)
        self._show("Like the clicked place..." if like else "Searching...")
        QgsApplication.taskManager().addTask(task)

    def cancel(self) -> None:
        if self.task is not None:
            self._show("Cancelling...")
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.form.searchButton.setEnabled(not running)
        self.form.likeButton.setEnabled(not running)
        self.form.searchCancelButton.setEnabled(running)

    def _show(self, text: str, error: bool = False) -> None:
        label = self.form.searchStatusLabel
        label.setStyleSheet("color: #b00020;" if error else "")
        label.setText(text)  # a plain-text label: quotes and < > of the backend's sentences shown as they are
        if error:
            self.last_error = text
            log(text, Qgis.MessageLevel.Warning)

    def _job_updated(self, job: dict) -> None:
        self.form.searchProgressBar.setValue(round(100 * float(job.get("progress") or 0.0)))
        self._show(eta_text(job))

    def _finish(self, state: str) -> None:
        self.task = None
        self._set_running(False)
        self.searchFinished.emit(state)

    def _job_done(self, job: dict) -> None:
        result = job.get("result") or {}
        if self.searching_project != self.dock.project_generation:
            # The project the search was sent in was closed (File > New, another project opened): its hits
            # are not that project's; the file is kept and said.
            path = (result.get("outputs") or {}).get("vector")
            self.form.searchProgressBar.setValue(100)
            self._show(f"Done, but the project this search was started in was closed meanwhile: its hits were not "
                       f"added to the project open now. The hits file is kept: {path or 'none reported'}. Add it "
                       "with Layer > Add Layer, or search again in this project.")
            self._finish("done")
            return
        # The searched layer may have been removed from the project while the search ran: its hits file is
        # written all the same, and is loaded under the name the layer had when the search was sent.
        alive = searched_layer_alive(self.searching)
        try:
            self.hits_layer = load_hits(job, self.searching if alive else None,
                                        f"FarSLIP hits {self.searching_name}")
            self.hits_crs = QgsCoordinateReferenceSystem(self.hits_layer.crs())
            # The hits listed next are this raster's; a later search that fails leaves them with theirs.
            self.raster_layer = self.searching
        except RuntimeError as error:
            self._show(str(error), error=True)
            self._finish("failed")
            return
        hits = result.get("hits") or []
        self.show_hits(hits)
        notices = result.get("notices") or []
        if job.get("cancelled_too_late"):  # the analyst pressed Cancel as the search finished
            notices = [CANCEL_TOO_LATE, *notices]
        if not alive:
            notices = [f"The searched raster {self.searching_name} was removed from the project while the search "
                       "ran; add it again to see the hits on it.", *notices]
        self.form.searchProgressBar.setValue(100)
        found = "1 hit" if len(hits) == 1 else f"{len(hits)} hits"
        self._show(" ".join([f"{found}; click one to zoom to it." if hits else "No hits.", *notices]))
        self._finish("done")

    def _job_failed(self, message: str) -> None:
        kind = self.task.failure_kind if self.task is not None else ""
        self._show(self.dock.job_error_text(message, kind)[0], error=True)
        self._finish("failed")

    def _job_cancelled(self) -> None:
        self.form.searchProgressBar.setValue(0)
        self._show("Cancelled; nothing was written.")
        self._finish("cancelled")

    # -- hits ----------------------------------------------------------------------------------
    def show_hits(self, hits: list[dict]) -> None:
        self.form.hitsList.clear()
        for hit in hits:
            item = QListWidgetItem(hit_text(hit))
            item.setData(HIT_BOUNDS, list(hit["bbox"]))
            item.setData(HIT_FOOTPRINT, [list(corner) for corner in hit.get("footprint") or []])
            self.form.hitsList.addItem(item)

    def hit_rectangle(self, item: QListWidgetItem) -> QgsRectangle:
        """The hit's rectangle in the raster's CRS (the CRS of the hits layer)."""
        xmin, ymin, xmax, ymax = item.data(HIT_BOUNDS)
        return QgsRectangle(xmin, ymin, xmax, ymax)

    def zoom_to_hit(self, item: QListWidgetItem) -> None:
        extent = transform_extent(self.hit_rectangle(item), self.hits_crs, self.canvas.mapSettings().destinationCrs())
        extent.scale(1.2)
        self.canvas.setExtent(extent)
        self.canvas.refresh()

    def use_hit_as_extent(self) -> None:
        """The selected hit becomes the Segment tab's drawn extent, on the searched raster.

        On a rotated grid the hit is not its envelope (the rectangle drawn), which reaches far beyond it: the
        hit's window of the raster's own pixels goes with it, and a run on that raster segments that window (a
        VRT of it, also of a layer searched through its VRT: that VRT has the dataset's own pixel grid)."""
        item = self.form.hitsList.currentItem()
        if item is None or self.raster_layer is None:
            return
        if not searched_layer_alive(self.raster_layer):
            self._show("The searched raster layer was removed from the project; add it again and search again.",
                       error=True)
            return
        layer = self.raster_layer
        source = gdal_dataset_name(layer)
        window = hit_window(source, item.data(HIT_FOOTPRINT) or []) if source is not None else None
        self.dock.form.layerCombo.setLayer(layer)
        self.dock.set_drawn_extent(self.hit_rectangle(item), self.hits_crs,
                                   (layer, window) if window is not None else None)
        self.dock.form.tabs.setCurrentIndex(0)

    # -- query by example ----------------------------------------------------------------------
    def _like_toggled(self, checked: bool) -> None:
        if checked:
            self.canvas.setMapTool(self.point_tool)
            self._show("Click the place to find more places like it.")
        elif self.canvas.mapTool() is self.point_tool:
            self.canvas.unsetMapTool(self.point_tool)

    def _example_clicked(self, point: QgsPointXY, _button=None) -> None:
        self.form.likeButton.setChecked(False)
        self.search(like=(point.x(), point.y(), self.canvas.mapSettings().destinationCrs()))

    def forget_hits(self) -> None:
        """The project was closed (File > New, another project opened): the hits listed lie on a raster of it,
        so the list is emptied (a search still running is not shown in the next project either: `_job_done`)."""
        self.form.hitsList.clear()
        self.form.useHitButton.setEnabled(False)
        self.hits_layer = None
        self.raster_layer = None
        self.hits_crs = QgsCoordinateReferenceSystem()

    def close_down(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.canvas.mapTool() is self.point_tool:
            self.canvas.unsetMapTool(self.point_tool)


def clicked_on_layer(point: QgsPointXY, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer) -> bool:
    """Whether a point clicked on the map (in the map's `crs`) lies within the layer's extent (the backend
    then checks a rotated raster's footprint)."""
    try:
        on_layer = QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transform(point)
    except QgsCsException:
        return False
    return layer.extent().contains(on_layer)


def searched_layer_alive(layer: QgsRasterLayer | None) -> bool:
    """Whether the layer searched is still in the project (removed, its object is deleted or orphaned)."""
    return layer is not None and not sip.isdeleted(layer) and QgsProject.instance().mapLayer(layer.id()) is not None
