"""The Review tab saves its marks while QGIS holds the review GeoPackage open: QGIS keeps a GeoPackage it read
open (its connection pool) even after the corrections layer is removed, and Windows refuses to replace an open
file (simulated: os.replace onto the existing review file raises PermissionError). The marks are written into
the file, so a second "Train on my corrections" trains on all of them."""

from __future__ import annotations

import os
import sys

from osgeo import ogr
from plugin_helpers import save_as_geopackage
from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsProject, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant


def write_result(path: str) -> QgsVectorLayer:
    memory = QgsVectorLayer("Polygon?crs=EPSG:32633", "result", "memory")
    memory.dataProvider().addAttributes([QgsField("class", QVariant.String), QgsField("quality", QVariant.Double)])
    memory.updateFields()
    for index, (cls, quality) in enumerate((("road", 0.1), ("tree", 0.2), ("road", 0.3), ("building", 0.4))):
        feature = QgsFeature(memory.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(500000 + index * 100, 5000000,
                                                              500050 + index * 100, 5000050)))
        feature.setAttributes([cls, quality])
        memory.dataProvider().addFeature(feature)
    save_as_geopackage(memory, path)
    layer = QgsVectorLayer(path, "FarSLIP result", "ogr")
    QgsProject.instance().addMapLayer(layer)
    return layer


class _Forward:
    """Everything of the wrapped GDAL object, except what a subclass defines."""

    def __init__(self, wrapped, marks: list):
        self.wrapped, self.marks = wrapped, marks

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


class _Layer(_Forward):
    def __iter__(self):
        return iter(self.wrapped)

    def CreateFeature(self, feature):
        self.marks.append(feature)
        return ogr.OGRERR_FAILURE if len(self.marks) == 2 else self.wrapped.CreateFeature(feature)


class _Dataset(_Forward):
    def GetLayerByName(self, name):
        layer = self.wrapped.GetLayerByName(name)
        return _Layer(layer, self.marks) if layer is not None else None


class DiskFullAtTheSecondMark(_Forward):
    """GDAL's ogr module whose datasets opened for writing fail the second feature written into them."""

    def __init__(self, module):
        super().__init__(module, [])

    def Open(self, path, update=0):
        dataset = self.wrapped.Open(path, update)
        return _Dataset(dataset, self.marks) if dataset is not None and update else dataset


def saved_marks(path: str) -> list[tuple[str, str]]:
    dataset = ogr.Open(path)  # kept while its layer is read
    return sorted((row.GetField("status"), row.GetField("cls") or "") for row in dataset.GetLayerByName("review"))


def test_a_second_training_on_corrections_saves_into_the_open_review_file(bare_dock, tmp_path, monkeypatch):
    tab = bare_dock.review_tab
    tab.review(write_result(str(tmp_path / "result.gpkg")))
    review = str(tmp_path / "result_review.gpkg")
    started = []
    monkeypatch.setattr(bare_dock.train_tab, "train", lambda: started.append(bare_dock.form.labelsCombo.currentLayer()))
    for row in (0, 1):
        tab.form.polygonsTable.selectRow(row)
        tab.mark("correct")
    tab.train_on_corrections()
    assert len(started) == 1 and started[0].featureCount() == 2

    real_replace = os.replace

    def windows_replace(source, target):
        if os.path.exists(target) and os.path.samefile(target, review):
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", os.fspath(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", windows_replace)
    tab.form.polygonsTable.selectRow(2)
    tab.form.relabelCombo.setCurrentText("parking lot")
    tab.mark("relabelled", "parking lot")
    assert tab.form.reviewStatusLabel.text() == f"3 marked (3 usable for training), saved to {review}."
    tab.form.polygonsTable.selectRow(3)
    tab.mark("deleted")
    tab.train_on_corrections()

    assert saved_marks(review) == [("correct", "road"), ("correct", "tree"), ("deleted", ""),
                                   ("relabelled", "parking lot")]
    assert len(started) == 2, tab.form.reviewStatusLabel.text()
    labels = started[1]
    assert labels is bare_dock.form.labelsCombo.currentLayer() and labels.featureCount() == 3  # not the deleted one
    assert sorted(feature["cls"] for feature in labels.getFeatures()) == ["parking lot", "road", "tree"]
    assert [layer.name() for layer in QgsProject.instance().mapLayers().values()].count("FarSLIP review") == 1
    assert sorted(name for name in os.listdir(tmp_path) if not name.endswith(("-wal", "-shm"))) == [
        "result.gpkg", "result_review.gpkg"]


def test_a_save_into_the_review_file_that_fails_half_way_leaves_the_earlier_marks(bare_dock, tmp_path, monkeypatch):
    tab = bare_dock.review_tab
    tab.review(write_result(str(tmp_path / "result.gpkg")))
    review = str(tmp_path / "result_review.gpkg")
    for row in (0, 1):
        tab.form.polygonsTable.selectRow(row)
        tab.mark("correct")
    # The tab's GDAL sees a full disk at the second mark it writes into the review file. (Patching the class,
    # ogr.Layer.CreateFeature, at times did not take: read back, it was still GDAL's own, and the save succeeded.)
    tab_module = sys.modules[type(tab).__module__]
    monkeypatch.setattr(tab_module, "ogr", DiskFullAtTheSecondMark(tab_module.ogr))
    tab.form.polygonsTable.selectRow(2)
    tab.mark("deleted")
    assert tab.form.reviewStatusLabel.text() == (
        f"Saving the review to {review} failed: a mark could not be written; the marks are kept here and saved with "
        "the next one (close any other program that has the file open).")
    monkeypatch.undo()
    assert saved_marks(review) == [("correct", "road"), ("correct", "tree")]  # as before, not half of the new ones
    tab.form.polygonsTable.selectRow(3)
    tab.mark("correct")
    assert saved_marks(review) == [("correct", "building"), ("correct", "road"), ("correct", "tree"), ("deleted", "")]
