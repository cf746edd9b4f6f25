"""The dock's Review tab: check a result's least sure polygons first, mark them, train on the marks.

Polygons are listed by their `quality` (the backend's label-free estimate), lowest first; a click
zooms the map to one. The analyst marks it correct, relabels it, or deletes it; the marks are kept in
a GeoPackage beside the result (`<result>_review.gpkg`, field `cls`, the training format), and "Train
on my corrections" hands that layer to the Train tab. The result layer can be shown by class or by
quality, and polygons under a quality value can be hidden.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Callable, NamedTuple

from osgeo import ogr
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsGradientColorRamp,
    QgsGraduatedSymbolRenderer,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRendererRange,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt import uic
from qgis.PyQt.QtCore import QMetaType, QObject, Qt, QVariant
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import QTableWidgetItem, QWidget

from .extent import (LocalCopyError, gdal_dataset_name, is_kept_vrt, local_raster_path, missing_layer_file,
                     read_kept_vrt, vrt_arguments)
from .filenames import safe_file_stem, same_file
from .i18n import tr
from .results import CLASS_FIELD, RASTER_PROPERTY, categorized_renderer, layer_classes

FORM, _ = uic.loadUiType(os.path.join(os.path.dirname(__file__), "ui", "review_tab.ui"))
QUALITY_FIELD = "quality"
LABEL_FIELD = "cls"  # the class field of the corrections layer (what `farslip train --class-field` reads)
CORRECT, RELABELLED, DELETED = "correct", "relabelled", "deleted"
STYLE_CLASS, STYLE_QUALITY = "class", "quality"
FID_ROLE = Qt.ItemDataRole.UserRole
ESTIMATE_PROPERTY = "farslip/estimated_miou"  # the run's label-free estimate, kept with its layer (and project)
# Five quality classes from red (doubtful) to green (likely right).
QUALITY_BREAKS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def quality_renderer() -> QgsGraduatedSymbolRenderer:
    """A graduated style of `quality`: red for doubtful polygons, green for likely right ones."""
    ramp = QgsGradientColorRamp(QColor(215, 48, 39, 160), QColor(26, 152, 80, 160))
    ranges = []
    for index, (low, high) in enumerate(zip(QUALITY_BREAKS, QUALITY_BREAKS[1:])):
        colour = ramp.color(index / (len(QUALITY_BREAKS) - 2))
        symbol = QgsFillSymbol.createSimple({"color": colour.name(QColor.NameFormat.HexArgb),
                                             "outline_color": "35,35,35,200", "outline_width": "0.2"})
        ranges.append(QgsRendererRange(low, high, symbol, f"{low:.1f} - {high:.1f}"))
    renderer = QgsGraduatedSymbolRenderer(QUALITY_FIELD, ranges)
    renderer.setSourceColorRamp(ramp)
    return renderer


def field_type(name: str):
    """A QgsField type by its QMetaType.Type name ("QString", "Double", "Int"): QMetaType from QGIS 3.38 on (QGIS 4
    has no QVariant.Type), QVariant.Type before (QGIS 3.22's QgsField refuses QMetaType)."""
    if Qgis.QGIS_VERSION_INT >= 33800:
        return getattr(QMetaType.Type, name)
    return getattr(QVariant, "String" if name == "QString" else name)


def field_text(value) -> str:
    """A field's value as the tab shows and saves it: "" for NULL (a polygon the analyst digitised by hand has no
    quality, maybe no class)."""
    return "" if value is None or (isinstance(value, QVariant) and value.isNull()) else str(value)


def field_number(value) -> float | None:
    """A numeric field's value; None for NULL (or a value that is no number)."""
    try:
        return float(field_text(value)) if field_text(value) else None
    except ValueError:
        return None


def number_text(value, decimals: int) -> str:
    number = field_number(value)
    return "" if number is None else f"{number:.{decimals}f}"


def mark_text(status: str, cls: str) -> str:
    """A mark as the list shows it: 'correct', 'relabelled: road', 'deleted'."""
    return tr(status) if status != RELABELLED else f"{tr(status)}: {cls}"


def has_quality(layer) -> bool:
    """A FarSLIP result: its polygons have a class and a quality (a corrections layer has `cls`, not `class`)."""
    return (isinstance(layer, QgsVectorLayer) and layer.isValid() and layer.fields().indexOf(QUALITY_FIELD) >= 0
            and layer.fields().indexOf(CLASS_FIELD) >= 0)


def reads_raster(layer: QgsRasterLayer, path: str) -> bool:
    """Whether a run on `layer` reads the raster file `path`: the layer's own file, or a VRT the plugin keeps
    (`is_kept_vrt`) of the layer (a zipped layer, a CRS set in QGIS) or of a window of its pixels (a search hit
    on a rotated grid, used as the extent). Never a layer of a kept VRT itself: the cache may remove it."""
    if not layer.isValid() or gdal_dataset_name(layer) is None:
        return False
    if not is_kept_vrt(path):
        own = local_raster_path(layer)
        return own is not None and same_file(own, path)
    # A kept VRT's name is made of the layer's dataset, the CRS set in QGIS and the window (vrt_path): the VRT of
    # the whole layer, or of the window it holds (a hit's window may be all of a small raster: both are tried).
    # A VRT pruned since is still known by the first.
    kept = read_kept_vrt(path)
    windows = [None] if kept is None else [None, kept.window]
    try:
        return any(same_file(vrt_arguments(layer, window)[2], path) for window in windows)
    except LocalCopyError:  # a nodata QGIS cannot hand over: no run reads this layer
        return False


def project_raster_of(path: str, project: QgsProject) -> QgsRasterLayer | None:
    """The project's raster layer that a run reads as the file `path` (`reads_raster`), if there is one."""
    return next((layer for layer in project.mapLayers().values()
                 if isinstance(layer, QgsRasterLayer) and reads_raster(layer, path)), None)


def kept_vrt_layer(path: str) -> QgsRasterLayer | None:
    """A new layer of the dataset that the kept VRT `path` describes, with the CRS the VRT gives its pixels where
    the dataset's own is not that, when a run on it reads this very VRT; None when it does not, and for a VRT
    that is gone."""
    kept = read_kept_vrt(path)
    if kept is None:
        return None
    name = os.path.splitext(os.path.basename(kept.source.rstrip("/\\")))[0] or kept.source
    layer = QgsRasterLayer(kept.source, name, "gdal")
    if reads_raster(layer, path):
        return layer
    if layer.isValid() and kept.srs:  # a CRS set in QGIS (Layer > Set CRS), which the VRT carries
        layer.setCrs(QgsCoordinateReferenceSystem.fromWkt(kept.srs))
        if reads_raster(layer, path):
            return layer
    return None


def layer_file(layer: QgsVectorLayer) -> str:
    """The file of an OGR layer ("" for a layer without one: a temporary layer, a database table)."""
    path = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source()).get("path") or ""
    return path if layer.providerType() == "ogr" and os.path.isfile(path) else ""


def reported_estimate(path: str) -> float | None:
    """The label-free estimated mIoU in the run report beside the result file `path` (r.gpkg -> r.report.json),
    when that report is the report of this very file; None otherwise."""
    report_path = os.path.splitext(path)[0] + ".report.json"
    try:
        with open(report_path, encoding="utf-8") as handle:
            report = json.load(handle)
        vector = str((report.get("outputs") or {}).get("vector") or "")
        if not vector or not same_file(vector, path):
            return None
        return field_number((report.get("quality") or {}).get("estimated_miou"))
    except (OSError, ValueError, AttributeError):  # no report, not JSON, not a report
        return None


def layer_estimate(layer: QgsVectorLayer) -> float | None:
    """The estimated mIoU of the run that made `layer`: its report's (the file's own run), else the one the
    dock recorded on the layer when the run finished; None when neither is known."""
    path = layer_file(layer)
    estimate = reported_estimate(path) if path else None
    return estimate if estimate is not None else field_number(layer.customProperty(ESTIMATE_PROPERTY))


class SavedMarks:
    """The marks in a review file: feature id -> (status, class), and each polygon's shape and quality as saved;
    `error` says why the file cannot be read ("" when it can, or when there is none yet)."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[str, str]] = {}
        self.shapes: dict[int, tuple[QgsGeometry, float | None]] = {}
        self.others: list[StaleMark] = []  # a second row of one feature id (kept as it is, see ReviewTab.stale)
        self.error = ""


class StaleMark(NamedTuple):
    """A saved mark of a polygon the result no longer has under its feature id, kept in the review file as it
    was saved (its shape, class and status) and shown on no polygon."""

    fid: int
    status: str
    cls: str
    geometry: QgsGeometry | None
    quality: float | None


def same_polygon(saved: QgsGeometry, now: QgsGeometry) -> bool:
    """Whether a polygon saved with a mark is the one a feature of that id has now: most of their union is
    shared (an analyst's vertex edits keep it; another result written to the same file, whose feature ids
    start again at 1, does not)."""
    if saved is None or saved.isEmpty():
        return True  # saved without a shape: nothing to compare (as before)
    if now is None or now.isEmpty():
        return False
    union = saved.combine(now).area()
    if union <= 0:
        return saved.equals(now)
    return saved.intersection(now).area() >= 0.5 * union


def read_review_file(path: str) -> SavedMarks:
    """Read the marks saved in `path` (GDAL directly: QGIS's connection pool could hold an older copy)."""
    saved = SavedMarks()
    if not os.path.exists(path):
        return saved
    try:
        dataset = ogr.Open(path)
    except RuntimeError:  # GDAL's exceptions on: a file it cannot open
        dataset = None
    table = dataset.GetLayerByName("review") if dataset is not None else None
    names = set()
    if table is not None:
        definition = table.GetLayerDefn()
        names = {definition.GetFieldDefn(i).GetName() for i in range(definition.GetFieldCount())}
    if table is None or not {LABEL_FIELD, "status", "source_fid"} <= names:
        saved.error = tr("The review file {} cannot be read (it is not a FarSLIP review GeoPackage, or it is "
                         "damaged); your earlier marks may be in it, so it is left as it is and new marks are not "
                         "saved: move it away or repair it, then choose the layer again.").format(path)
        return saved
    for row in table:
        fid, status = row.GetField("source_fid"), row.GetField("status") or ""
        if fid is None or status not in (CORRECT, RELABELLED, DELETED):
            continue
        shape = row.GetGeometryRef()
        quality = field_number(row.GetField(QUALITY_FIELD)) if QUALITY_FIELD in names else None
        geometry = None
        if shape is not None:
            geometry = QgsGeometry()
            geometry.fromWkb(bytes(shape.ExportToIsoWkb()))
        cls = row.GetField(LABEL_FIELD) or ""
        if int(fid) in saved.marks:  # a polygon of this id marked before another one took the id
            saved.others.append(StaleMark(int(fid), status, cls, geometry, quality))
            continue
        saved.marks[int(fid)] = (status, cls)
        if geometry is not None:
            saved.shapes[int(fid)] = (geometry, quality)
    return saved


def write_marks_into(partial: str, path: str) -> bool:
    """Put the rows of the review table of the GeoPackage `partial` in place of those of `path`'s, in one
    transaction through GDAL (SQLite lets it write while other connections, QGIS's, hold the file open); False
    when `path`'s table is not of the same fields and CRS (then the whole file is replaced). A write that fails
    leaves `path` as it was and raises OSError."""
    try:
        source, target = ogr.Open(partial), ogr.Open(path, 1)
    except RuntimeError as error:  # GDAL's exceptions on
        raise OSError(str(error)) from None
    if source is None or target is None:
        raise OSError(tr("GDAL cannot open it for writing"))
    new, old = source.GetLayerByName("review"), target.GetLayerByName("review")
    if new is None or old is None:
        return False
    new_fields, old_fields = new.GetLayerDefn(), old.GetLayerDefn()
    names = [new_fields.GetFieldDefn(i).GetName() for i in range(new_fields.GetFieldCount())]
    if names != [old_fields.GetFieldDefn(i).GetName() for i in range(old_fields.GetFieldCount())]:
        return False
    new_crs, old_crs = new.GetSpatialRef(), old.GetSpatialRef()
    if (new_crs is None) != (old_crs is None) or (new_crs is not None and not new_crs.IsSame(old_crs)):
        return False
    try:
        if target.StartTransaction() != ogr.OGRERR_NONE:
            raise OSError(tr("it is busy (another program is writing to it)"))
        try:
            for fid in [row.GetFID() for row in old]:
                if old.DeleteFeature(fid) != ogr.OGRERR_NONE:
                    raise OSError(tr("an earlier mark could not be replaced"))
            for row in new:
                out = ogr.Feature(old_fields)
                out.SetFrom(row)
                if old.CreateFeature(out) != ogr.OGRERR_NONE:
                    raise OSError(tr("a mark could not be written"))
            if target.CommitTransaction() != ogr.OGRERR_NONE:
                raise OSError(tr("it is busy (another program is reading or writing it)"))
        except BaseException:
            target.RollbackTransaction()
            raise
    except RuntimeError as error:  # GDAL's exceptions on
        raise OSError(str(error)) from None
    finally:
        new = old = None
        source = target = None  # closed
    return True


class ReviewTab(QObject):
    def __init__(self, dock, train_tab, project_getter: Callable[[], QgsProject] = QgsProject.instance):
        super().__init__(dock)
        self.dock = dock
        self.canvas = dock.canvas
        self.train_tab = train_tab
        self.project = project_getter
        self.page = QWidget()
        self.form = FORM()
        self.form.setupUi(self.page)
        dock.form.tabs.addTab(self.page, tr("Review"))
        self.marks: dict[int, tuple[str, str]] = {}  # feature id -> (status, class)
        # The shape and quality a mark was saved with, for a polygon the list does not show now (deleted since,
        # hidden by the filter): its mark is kept, never dropped from the file.
        self.mark_shapes: dict[int, tuple[QgsGeometry, float | None]] = {}
        # Saved marks of polygons the layer no longer has under their feature id (another result written to the
        # same file reuses the ids): kept in the file as saved, never shown on (or saved with) the new polygon.
        self.stale: list[StaleMark] = []
        self.unreadable = ""  # why the layer's review file cannot be read: then nothing is written over it
        self.corrections_layer: QgsVectorLayer | None = None
        form = self.form
        form.reviewLayerCombo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        form.reviewLayerCombo.setAllowEmptyLayer(True)
        form.styleCombo.addItem(tr("Colour by class"), STYLE_CLASS)
        form.styleCombo.addItem(tr("Colour by quality"), STYLE_QUALITY)
        form.polygonsTable.setColumnCount(5)
        form.polygonsTable.setHorizontalHeaderLabels([tr("Quality"), tr("Class"), tr("Area (m²)"), tr("Mark"),
                                                       tr("Id")])
        form.reviewLayerCombo.layerChanged.connect(self.show_layer)
        form.styleCombo.currentIndexChanged.connect(lambda _index: self.apply_style())
        form.hideLowCheck.toggled.connect(lambda _on: self.apply_filter())
        form.qualitySpin.valueChanged.connect(lambda _value: self.apply_filter())
        form.polygonsTable.itemSelectionChanged.connect(self.zoom_to_selected)
        form.correctButton.clicked.connect(lambda: self.mark(CORRECT))
        form.relabelButton.clicked.connect(lambda: self.mark(RELABELLED, form.relabelCombo.currentText()))
        form.deleteButton.clicked.connect(lambda: self.mark(DELETED))
        form.trainCorrectionsButton.clicked.connect(self.train_on_corrections)
        self.listed_layer_id: str | None = None  # the layer whose polygons the list shows (and marks refer to)
        # QGIS 3.22's layer combo does not say layerChanged when its layer leaves the project: the list
        # would go on showing the removed layer's polygons, and a mark would land on another layer.
        self.project().layersRemoved.connect(self._layers_removed)
        self.show_layer(None)

    def _layers_removed(self, layer_ids) -> None:
        if self.listed_layer_id is not None and self.listed_layer_id in layer_ids:
            self.show_layer()

    # -- the result layer ----------------------------------------------------------------------
    def layer(self) -> QgsVectorLayer | None:
        layer = self.form.reviewLayerCombo.currentLayer()
        return layer if has_quality(layer) else None

    def review(self, layer: QgsVectorLayer, estimated_miou: float | None = None) -> None:
        """Show `layer` (a finished result) in the tab; the dock calls this after each run, with the run's
        estimate, which stays with the layer: choosing another result shows that one's own."""
        if estimated_miou is not None:
            layer.setCustomProperty(ESTIMATE_PROPERTY, float(estimated_miou))
        self.form.reviewLayerCombo.setLayer(layer)
        self.show_estimate()

    def show_estimate(self) -> None:
        """The estimated mIoU of the run that made the layer shown (never another run's)."""
        layer = self.layer()
        estimate = layer_estimate(layer) if layer is not None else None
        if layer is None:
            self.form.estimateLabel.setText("")
        elif estimate is None:
            self.form.estimateLabel.setText(tr("No label-free estimate of mIoU is recorded for this layer."))
        else:
            self.form.estimateLabel.setText(tr("Estimated mIoU of this run (no labels used): {:.0%}").format(
                estimate))

    def show_layer(self, _layer=None) -> None:
        self.marks, self.mark_shapes, self.stale, self.unreadable = {}, {}, [], ""
        self.corrections_layer = None
        layer = self.layer()
        self.listed_layer_id = layer.id() if layer is not None else None
        self.show_estimate()
        # The style and filter controls say what this layer has (another layer's choices are its own).
        by_quality = layer is not None and isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
        hidden = layer is not None and f'"{QUALITY_FIELD}" >=' in layer.subsetString()
        for widget, show in ((self.form.styleCombo, lambda: self.form.styleCombo.setCurrentIndex(int(by_quality))),
                             (self.form.hideLowCheck, lambda: self.form.hideLowCheck.setChecked(hidden))):
            widget.blockSignals(True)
            show()
            widget.blockSignals(False)
        for widget in (self.form.correctButton, self.form.relabelButton, self.form.deleteButton,
                       self.form.trainCorrectionsButton, self.form.styleCombo, self.form.hideLowCheck):
            widget.setEnabled(layer is not None)
        if layer is None:
            self.form.polygonsTable.setRowCount(0)
            self.form.reviewStatusLabel.setText(tr("Choose a FarSLIP result (a layer with a quality field)."))
            return
        # The marks saved earlier (another session, before another result was shown) are this layer's marks.
        saved = read_review_file(self.corrections_path())
        self.marks, self.mark_shapes, self.stale, self.unreadable = saved.marks, saved.shapes, saved.others, saved.error
        self.list_polygons()
        if self.unreadable:
            self.form.reviewStatusLabel.setText(self.unreadable)

    def list_polygons(self) -> None:
        """List the layer's polygons with their marks. The mark of a polygon not listed (deleted since, hidden by
        the filter) is kept: it stays in the review file with the shape it was saved with."""
        layer = self.layer()
        table = self.form.polygonsTable
        table.setRowCount(0)
        classes = sorted({field_text(f[CLASS_FIELD]) for f in layer.getFeatures()} - {""})
        self.form.relabelCombo.clear()
        self.form.relabelCombo.addItems(classes)
        self.form.relabelCombo.setEditable(True)
        # Least sure first; polygons without a quality (digitised by hand) last, with an empty quality.
        request = QgsFeatureRequest().addOrderBy(QUALITY_FIELD, True, False)
        listed = set()
        for row, feature in enumerate(layer.dataProvider().getFeatures(request)):
            table.insertRow(row)
            listed.add(feature.id())
            self._match_saved_mark(feature)
            values = [number_text(feature[QUALITY_FIELD], 2), field_text(feature[CLASS_FIELD]),
                      number_text(feature["area_m2"], 0) if layer.fields().indexOf("area_m2") >= 0 else "",
                      mark_text(*self.marks[feature.id()]) if feature.id() in self.marks else "", str(feature.id())]
            for column, text in enumerate(values):
                item = QTableWidgetItem(text)
                item.setData(FID_ROLE, feature.id())
                table.setItem(row, column, item)
        earlier = sum(1 for fid in self.marks if fid in listed)
        status = tr("{} polygons, least sure first. Click one to zoom to it.").format(table.rowCount())
        if earlier:
            status += " " + tr("{} marked earlier (saved in {}).").format(earlier, self.corrections_path())
        if self.stale:
            status += " " + (tr("1 saved mark is of a polygon this layer no longer has (the file was written "
                                "again since): it stays in the review file as it was and is shown on no polygon.")
                             if len(self.stale) == 1 else
                             tr("{} saved marks are of polygons this layer no longer has (the file was written "
                                "again since): they stay in the review file as they were and are shown on no "
                                "polygon.").format(len(self.stale)))
        self.form.reviewStatusLabel.setText(status)

    def _match_saved_mark(self, feature: QgsFeature) -> None:
        """The saved mark of this feature id is this polygon's only when it was saved with this polygon (or
        without a shape); else it is set aside as stale, and a stale one saved with this polygon takes its place."""
        fid = feature.id()
        saved = self.mark_shapes.get(fid)
        if fid in self.marks and saved is not None and not same_polygon(saved[0], feature.geometry()):
            status, cls = self.marks.pop(fid)
            self.mark_shapes.pop(fid)
            self.stale.append(StaleMark(fid, status, cls, saved[0], saved[1]))
        if fid not in self.marks:
            for index, stale in enumerate(self.stale):
                if stale.fid == fid and stale.geometry is not None and same_polygon(stale.geometry, feature.geometry()):
                    del self.stale[index]
                    self.marks[fid] = (stale.status, stale.cls)
                    self.mark_shapes[fid] = (stale.geometry, stale.quality)
                    break

    def apply_style(self) -> None:
        layer = self.layer()
        if layer is None:
            return
        if self.form.styleCombo.currentData() == STYLE_QUALITY:
            layer.setRenderer(quality_renderer())
        else:  # the run's own classes in its order: the colours of its first style and of its class raster
            layer.setRenderer(categorized_renderer(layer_classes(layer)))
        layer.triggerRepaint()

    def apply_filter(self) -> None:
        layer = self.layer()
        if layer is None:
            return
        threshold = float(self.form.qualitySpin.value())
        # A polygon without a quality (digitised by hand) is not a doubtful one: it stays.
        layer.setSubsetString(f'"{QUALITY_FIELD}" >= {threshold:.4f} OR "{QUALITY_FIELD}" IS NULL'
                              if self.form.hideLowCheck.isChecked() else "")
        layer.triggerRepaint()

    # -- marking -------------------------------------------------------------------------------
    def selected_fid(self) -> int | None:
        items = self.form.polygonsTable.selectedItems()
        return int(items[0].data(FID_ROLE)) if items else None

    def selected_feature(self) -> QgsFeature | None:
        """The polygon selected in the list; None when none is, and when it was deleted since it was listed (then
        the tab says so and lists the polygons again)."""
        layer, fid = self.layer(), self.selected_fid()
        if layer is None or fid is None:
            return None
        if layer.id() != self.listed_layer_id:  # the list is of another layer: never mark this one by its ids
            self.show_layer()
            self.form.reviewStatusLabel.setText(tr("The list showed another layer; it shows {} now. Select a "
                                                   "polygon again.").format(layer.name()))
            return None
        feature = next(layer.dataProvider().getFeatures(QgsFeatureRequest(fid)), None)
        if feature is None or not feature.isValid():
            self.list_polygons()
            self.form.reviewStatusLabel.setText(tr("That polygon no longer exists; the list shows the polygons "
                                                   "there are now."))
            return None
        return feature

    def zoom_to_selected(self) -> None:
        feature, layer = self.selected_feature(), self.layer()
        if feature is None:
            return
        box = self.canvas.mapSettings().layerExtentToOutputExtent(layer, feature.geometry().boundingBox())
        box.scale(1.5)
        self.canvas.setExtent(box)
        self.canvas.refresh()

    def mark(self, status: str, cls: str = "") -> None:
        if self.layer() is None or self.selected_fid() is None:
            self.form.reviewStatusLabel.setText(tr("Select a polygon in the list first."))
            return
        if status == RELABELLED and not cls.strip():
            self.form.reviewStatusLabel.setText(tr("Choose or type the right class first."))
            return
        feature = self.selected_feature()
        if feature is None:
            return
        fid = feature.id()
        if status == CORRECT and not field_text(feature[CLASS_FIELD]):
            self.form.reviewStatusLabel.setText(tr("This polygon has no class; relabel it with the right one."))
            return
        if self.unreadable:  # never written over: the earlier marks may be in it
            self.form.reviewStatusLabel.setText(self.unreadable)
            return
        self.marks[fid] = (status, cls.strip() if status == RELABELLED else field_text(feature[CLASS_FIELD]))
        for row in range(self.form.polygonsTable.rowCount()):
            if int(self.form.polygonsTable.item(row, 0).data(FID_ROLE)) == fid:
                self.form.polygonsTable.item(row, 3).setText(mark_text(*self.marks[fid]))
        try:
            path = self.save_corrections()
        except RuntimeError as error:
            self.form.reviewStatusLabel.setText(str(error))
            return
        labelled = sum(1 for s, _ in self.marks.values() if s != DELETED)
        self.form.reviewStatusLabel.setText(tr("{} marked ({} usable for training), saved to {}.").format(
            len(self.marks), labelled, path))

    def corrections_path(self) -> str:
        """Beside the result's file (`<result>_review.gpkg`); for a result without a file of its own (a temporary
        layer, a database table) in the plugin's output folder, named after the layer (its id tells two layers of
        one name apart)."""
        layer = self.layer()
        path = layer_file(layer)
        if path:
            return os.path.splitext(path)[0] + "_review.gpkg"
        digest = hashlib.sha256(layer.id().encode("utf-8")).hexdigest()[:8]
        return os.path.join(self.dock.settings_loader().output_dir(),
                            f"{safe_file_stem(layer.name())}-{digest}_review.gpkg")

    def save_corrections(self) -> str:
        """Write the marks as a polygon layer: `cls` (the right class), `status`, `quality`, `source_fid`.
        Deleted polygons are kept with status 'deleted' and no class, so training leaves them out."""
        layer = self.layer()
        memory = QgsVectorLayer(f"Polygon?crs={layer.crs().authid() or layer.crs().toWkt()}", "review", "memory")
        provider = memory.dataProvider()
        provider.addAttributes([QgsField(LABEL_FIELD, field_type("QString")),
                                QgsField("status", field_type("QString")),
                                QgsField(QUALITY_FIELD, field_type("Double")),
                                QgsField("source_fid", field_type("Int"))])
        memory.updateFields()
        if memory.crs() != layer.crs():
            memory.setCrs(layer.crs())
        if self.unreadable:
            raise RuntimeError(self.unreadable)
        shapes = dict(self.mark_shapes)  # the polygons as saved; those the layer has now replace them
        for feature in layer.dataProvider().getFeatures(QgsFeatureRequest().setFilterFids(list(self.marks))):
            shapes[feature.id()] = (feature.geometry(), field_number(feature[QUALITY_FIELD]))
        rows = [StaleMark(fid, status, cls, *shapes[fid]) for fid, (status, cls) in sorted(self.marks.items())
                if fid in shapes]
        for mark in rows + self.stale:
            out = QgsFeature(memory.fields())
            if mark.geometry is not None:
                out.setGeometry(mark.geometry)
            out.setAttributes([mark.cls if mark.status != DELETED else None, mark.status, mark.quality, int(mark.fid)])
            provider.addFeature(out)
        path = self.corrections_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as error:
            raise RuntimeError(tr("Saving the review to {} failed: its folder cannot be created ({}); choose another "
                                  "output folder in the FarSLIP settings.").format(path, error.strerror)) from None
        options = QgsVectorFileWriter.SaveVectorOptions()
        options.driverName, options.fileEncoding = "GPKG", "UTF-8"
        options.layerName = "review"
        if self.corrections_layer is not None:
            self.project().removeMapLayer(self.corrections_layer.id())
            self.corrections_layer = None
        # Written beside it first: the review file is replaced only by a complete one.
        handle, partial = tempfile.mkstemp(suffix=".gpkg", prefix=".review-", dir=os.path.dirname(path))
        os.close(handle)
        os.remove(partial)
        try:
            error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
                memory, partial, self.project().transformContext(), options)
            if error != QgsVectorFileWriter.WriterError.NoError:
                raise RuntimeError(tr("Saving the review to {} failed: {}").format(path, message))
            # An existing review file gets the marks written into it (one transaction: all of them or none), never
            # replaced: QGIS keeps a GeoPackage it read open (its connection pool, after the layer is removed), and
            # Windows refuses to replace an open file.
            if not (os.path.exists(path) and write_marks_into(partial, path)):
                os.replace(partial, path)
        except OSError as failure:
            raise RuntimeError(tr("Saving the review to {} failed: {}; the marks are kept here and saved with the "
                                  "next one (close any other program that has the file open).").format(
                                      path, failure.strerror or failure)) from None
        finally:
            if os.path.exists(partial):
                with contextlib.suppress(OSError):  # a hidden draft left behind, never a failed save
                    os.remove(partial)
        self.mark_shapes = shapes
        return path

    def train_on_corrections(self) -> None:
        """Open the marks (without deleted polygons) as the Train tab's labels and start training."""
        if not any(status != DELETED for status, _ in self.marks.values()):
            self.form.reviewStatusLabel.setText(tr("Mark some polygons correct or relabel them first: those are "
                                                   "the examples training learns from."))
            return
        raster, refusal = self.source_raster()
        try:
            path = self.save_corrections()
        except RuntimeError as error:
            self.form.reviewStatusLabel.setText(str(error))
            return
        corrections = QgsVectorLayer(f"{path}|layername=review", tr("FarSLIP review"), "ogr")
        corrections.setSubsetString("\"status\" != 'deleted'")
        self.project().addMapLayer(corrections)
        self.corrections_layer = corrections
        form = self.dock.form
        form.labelsCombo.setLayer(corrections)
        form.classFieldCombo.setLayer(corrections)
        form.classFieldCombo.setField(LABEL_FIELD)
        if raster is not None:
            form.trainRasterCombo.setLayer(raster)
        form.tabs.setCurrentWidget(form.tabs.widget(self._train_page_index()))
        if refusal:
            self.form.reviewStatusLabel.setText(refusal)
            return
        self.train_tab.train()

    def source_raster(self) -> tuple[QgsRasterLayer | None, str]:
        """The raster the reviewed result was segmented from, as a project layer (added when it is not one yet),
        and why training cannot start on it ("" when it can). A result without a recorded raster (one opened
        from a file) leaves the Train tab's choice as it is."""
        layer = self.layer()
        recorded = str(layer.customProperty(RASTER_PROPERTY) or "")
        if not recorded:
            return None, ""
        raster = project_raster_of(recorded, self.project())
        if raster is not None:
            return raster, ""
        if is_kept_vrt(recorded):  # the layer itself, never a layer of its VRT, which the plugin may remove
            if not os.path.isfile(recorded):
                return None, tr("{} was segmented through {}, a VRT the plugin kept of a layer and has removed since "
                                "(unused for long); the corrections are the Train tab's labels now: choose the "
                                "segmented layer there and press Train.").format(layer.name(), recorded)
            raster = kept_vrt_layer(recorded)
            if raster is None:
                return None, tr("{} was segmented from a layer that is no longer in the project (the backend read it "
                                "through {}, a VRT the plugin keeps of it); the corrections are the Train tab's "
                                "labels now: add that layer again, choose it there and press Train.").format(
                                    layer.name(), recorded)
        elif not os.path.isfile(recorded):
            gone = next((missing_layer_file(raster) for raster in self.project().mapLayers().values()
                         if isinstance(raster, QgsRasterLayer) and gdal_dataset_name(raster) == recorded), "")
            if gone:  # the project's layer of that file, deleted or moved since
                return None, tr("{} The corrections are the Train tab's labels now.").format(gone)
            # a temporary copy of a web layer removed after the run
            return None, tr("{} was segmented from {}, which is gone (a temporary copy of the layer for the backend); "
                            "the corrections are the Train tab's labels now: choose the segmented raster there and "
                            "press Train.").format(layer.name(), recorded)
        else:
            raster = QgsRasterLayer(recorded, os.path.splitext(os.path.basename(recorded))[0])
            if not raster.isValid():
                return None, tr("{} was segmented from {}, which QGIS cannot open; the corrections are the Train "
                                "tab's labels now: choose the segmented raster there and press Train.").format(
                                    layer.name(), recorded)
        self.project().addMapLayer(raster, False)
        self.project().layerTreeRoot().addLayer(raster)  # at the bottom: the result stays visible above it
        return raster, ""

    def _train_page_index(self) -> int:
        tabs = self.dock.form.tabs
        for index in range(tabs.count()):
            if tabs.widget(index).isAncestorOf(self.dock.form.labelsCombo):
                return index
        return tabs.currentIndex()
