"""The Review tab in real QGIS: least sure polygons first, zoom, mark, corrections in the training format,
style by quality, hide low quality, and "Train on my corrections" handing the marks to the Train tab."""

from __future__ import annotations

import os

import pytest
from plugin_helpers import memory_result, save_as_geopackage, write_result_file
from qgis.core import (
    NULL,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
    edit,
)
from qgis.PyQt.QtCore import QVariant

QUALITY = [0.9, 0.2, 0.55, 0.05, 0.7]
CLASSES = ["building", "road", "building", "tree", "road"]


def write_result(path: str, west: float = 500000) -> QgsVectorLayer:
    memory = QgsVectorLayer("Polygon?crs=EPSG:32633", "result", "memory")
    provider = memory.dataProvider()
    provider.addAttributes([QgsField("class", QVariant.String), QgsField("area_m2", QVariant.Double),
                            QgsField("quality", QVariant.Double)])
    memory.updateFields()
    for i, (quality, cls) in enumerate(zip(QUALITY, CLASSES)):
        feature = QgsFeature(memory.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(west + i * 100, 5000000, west + i * 100 + 50,
                                                              5000050)))
        feature.setAttributes([cls, 2500.0, quality])
        provider.addFeature(feature)
    save_as_geopackage(memory, path)
    layer = QgsVectorLayer(path, "FarSLIP result", "ogr")
    QgsProject.instance().addMapLayer(layer)
    return layer


@pytest.fixture
def dock(bare_dock):
    return bare_dock


def table_column(tab, column: int) -> list[str]:
    table = tab.form.polygonsTable
    return [table.item(row, column).text() for row in range(table.rowCount())]


def test_review_lists_least_sure_first_and_saves_marks_for_training(dock, tmp_path, qgis_iface, monkeypatch):
    from qgis_farslip.review_tab import LABEL_FIELD

    layer = write_result(str(tmp_path / "result.gpkg"))
    tab = dock.review_tab
    tab.review(layer, 0.42)
    assert "42%" in tab.form.estimateLabel.text()
    assert [float(q) for q in table_column(tab, 0)] == sorted(QUALITY)
    # Click the least sure polygon: the map zooms to it.
    tab.form.polygonsTable.selectRow(0)
    feature = next(f for f in layer.getFeatures() if abs(f["quality"] - 0.05) < 1e-9)
    canvas = qgis_iface.mapCanvas()
    box = canvas.mapSettings().layerExtentToOutputExtent(layer, feature.geometry().boundingBox())
    assert canvas.extent().contains(box)
    tab.mark("correct")
    tab.form.polygonsTable.selectRow(1)
    tab.form.relabelCombo.setCurrentText("parking lot")
    tab.mark("relabelled", "parking lot")
    tab.form.polygonsTable.selectRow(2)
    tab.mark("deleted")
    saved = QgsVectorLayer(f"{tmp_path / 'result_review.gpkg'}|layername=review", "r", "ogr")
    marks = sorted((f["status"], f[LABEL_FIELD], round(f["quality"], 2)) for f in saved.getFeatures())
    assert [m[0] for m in marks] == ["correct", "deleted", "relabelled"]
    assert dict((m[0], m[1]) for m in marks)["relabelled"] == "parking lot"
    assert dict((m[0], m[1]) for m in marks)["correct"] == "tree"
    assert table_column(tab, 3)[:3] == ["correct", "relabelled: parking lot", "deleted"]

    started = []
    monkeypatch.setattr(dock.train_tab, "train", lambda: started.append(True))
    tab.train_on_corrections()
    labels = dock.form.labelsCombo.currentLayer()
    assert started and labels is not None and labels.featureCount() == 2  # the deleted one is left out
    assert dock.form.classFieldCombo.currentField() == LABEL_FIELD


def test_style_by_quality_and_hide_low_quality(dock, tmp_path):
    layer = write_result(str(tmp_path / "result.gpkg"))
    tab = dock.review_tab
    tab.review(layer)
    tab.form.styleCombo.setCurrentIndex(tab.form.styleCombo.findData("quality"))
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "quality"
    tab.form.qualitySpin.setValue(0.5)
    tab.form.hideLowCheck.setChecked(True)
    assert layer.featureCount() == 3
    tab.form.hideLowCheck.setChecked(False)
    assert layer.featureCount() == 5
    tab.form.styleCombo.setCurrentIndex(tab.form.styleCombo.findData("class"))
    assert layer.renderer().classAttribute() == "class"


def test_training_needs_at_least_one_kept_mark(dock, tmp_path, monkeypatch):
    layer = write_result(str(tmp_path / "result.gpkg"))
    tab = dock.review_tab
    tab.review(layer)
    started = []
    monkeypatch.setattr(dock.train_tab, "train", lambda: started.append(True))
    tab.train_on_corrections()
    assert not started and "Mark some polygons" in tab.form.reviewStatusLabel.text()


def test_polygons_without_quality_or_class_are_listed_last_kept_by_the_filter_and_saved(dock, tmp_path):
    """An analyst's hand-digitised polygon has no quality (NULL), maybe no class: listed with empty cells, those
    without a quality last; "Hide low quality" keeps them; marked correct it is saved with no quality."""
    from qgis_farslip.review_tab import LABEL_FIELD

    path = tmp_path / "result.gpkg"
    write_result_file(str(path), "EPSG:32633", (("water", 0.2), ("by hand", None), (None, 0.1)))
    layer = QgsVectorLayer(str(path), "FarSLIP result", "ogr")
    QgsProject.instance().addMapLayer(layer)
    tab = dock.review_tab
    tab.review(layer)
    assert table_column(tab, 0) == ["0.10", "0.20", ""]
    assert table_column(tab, 1) == ["", "water", "by hand"]
    tab.form.polygonsTable.selectRow(0)
    tab.mark("correct")
    assert tab.form.reviewStatusLabel.text() == "This polygon has no class; relabel it with the right one."
    tab.form.polygonsTable.selectRow(2)
    tab.mark("correct")
    saved = QgsVectorLayer(f"{tmp_path / 'result_review.gpkg'}|layername=review", "r", "ogr")
    assert [(f[LABEL_FIELD], f["quality"]) for f in saved.getFeatures()] == [("by hand", NULL)]
    tab.form.qualitySpin.setValue(0.5)
    tab.form.hideLowCheck.setChecked(True)
    assert sorted(f["class"] for f in layer.getFeatures()) == ["by hand"]


def test_a_polygon_deleted_after_listing_is_said_gone_and_the_list_refreshed(dock, tmp_path):
    layer = write_result(str(tmp_path / "result.gpkg"))
    tab = dock.review_tab
    tab.review(layer)
    tab.form.polygonsTable.selectRow(4)
    tab.mark("correct")
    for act in (tab.zoom_to_selected, lambda: tab.mark("correct")):
        tab.form.polygonsTable.selectRow(0)
        layer.dataProvider().deleteFeatures([tab.selected_fid()])
        act()
        assert tab.form.reviewStatusLabel.text().startswith("That polygon no longer exists"), act
    assert table_column(tab, 0) == ["0.55", "0.70", "0.90"]
    assert table_column(tab, 3) == ["", "", "correct"]  # the marks of the polygons still there are kept


def test_corrections_of_a_temporary_result_go_to_the_output_folder(dock, tmp_path, monkeypatch, plugin_settings):
    """A memory layer has no file to write beside: its corrections go to the plugin's output folder, never to a
    name made of its URI ('memory?geometry=...') in the working folder; a folder that cannot be made is said."""
    monkeypatch.chdir(tmp_path)
    layer = memory_result("EPSG:32633", (("water", 0.2), ("road", 0.4)))
    QgsProject.instance().addMapLayer(layer)
    tab = dock.review_tab
    tab.review(layer)
    tab.form.polygonsTable.selectRow(0)
    tab.mark("correct")
    saved = [name for name in os.listdir(tmp_path / "results") if name.endswith("_review.gpkg")]
    assert len(saved) == 1 and saved[0].startswith("result-"), saved
    assert tab.form.reviewStatusLabel.text().endswith(f"saved to {tmp_path / 'results' / saved[0]}.")
    assert os.listdir(tmp_path) == ["results"]

    (tmp_path / "a file").write_text("")
    plugin_settings(output_folder=str(tmp_path / "a file" / "results"))
    tab.form.polygonsTable.selectRow(1)
    tab.mark("correct")
    assert tab.form.reviewStatusLabel.text().startswith("Saving the review to "), tab.form.reviewStatusLabel.text()
    assert "choose another output folder in the FarSLIP settings" in tab.form.reviewStatusLabel.text()


def test_removing_the_reviewed_layer_lists_the_one_shown_and_no_mark_lands_on_another_layer(dock, tmp_path):
    """QGIS 3.22's layer combo does not say layerChanged when its layer is removed: the list went on showing
    the removed layer's polygons, and a mark was saved against the layer the combo showed next, by its ids."""
    first = write_result(str(tmp_path / "first.gpkg"))
    second = write_result(str(tmp_path / "second.gpkg"))
    with edit(second):  # the second result's classes differ from the first's
        for feature in second.getFeatures():
            second.changeAttributeValue(feature.id(), second.fields().indexOf("class"), "lake")
    tab = dock.review_tab
    tab.review(second)
    assert set(table_column(tab, 1)) == {"lake"}
    QgsProject.instance().removeMapLayer(second.id())
    shown = tab.form.reviewLayerCombo.currentLayer()
    if shown is not None:  # the combo shows another result: the list is that layer's
        assert shown.id() == first.id() and set(table_column(tab, 1)) == set(CLASSES)
    else:
        assert tab.form.polygonsTable.rowCount() == 0
    assert not os.path.exists(tmp_path / "first_review.gpkg")


def test_a_mark_on_a_list_of_another_layer_is_not_saved(dock, tmp_path):
    first = write_result(str(tmp_path / "first.gpkg"))
    second = write_result(str(tmp_path / "second.gpkg"))
    tab = dock.review_tab
    tab.review(second)
    tab.form.polygonsTable.selectRow(0)
    tab.form.reviewLayerCombo.blockSignals(True)  # as when the combo moved without saying so
    tab.form.reviewLayerCombo.setLayer(first)
    tab.form.reviewLayerCombo.blockSignals(False)
    tab.mark("correct")
    assert tab.form.reviewStatusLabel.text().startswith("The list showed another layer; it shows")
    assert not os.path.exists(tmp_path / "first_review.gpkg") and not os.path.exists(tmp_path / "second_review.gpkg")


def test_the_style_and_filter_controls_say_what_the_shown_layer_has(dock, tmp_path):
    first = write_result(str(tmp_path / "first.gpkg"))
    second = write_result(str(tmp_path / "second.gpkg"))
    tab = dock.review_tab
    tab.review(first)
    tab.form.styleCombo.setCurrentIndex(tab.form.styleCombo.findData("quality"))
    tab.form.hideLowCheck.setChecked(True)
    tab.review(second)  # a new run's result: its own classes' colours, nothing hidden
    assert tab.form.styleCombo.currentData() == "class" and not tab.form.hideLowCheck.isChecked()
    assert second.subsetString() == ""
    tab.review(first)
    assert tab.form.styleCombo.currentData() == "quality" and tab.form.hideLowCheck.isChecked()


def saved_marks(path) -> list[tuple[int, str]]:
    layer = QgsVectorLayer(f"{path}|layername=review", "review", "ogr")
    return sorted((f["source_fid"], f["status"]) for f in layer.getFeatures())


def test_marks_saved_earlier_are_shown_and_kept_after_another_result_and_a_reopened_project(dock, tmp_path):
    """The review file was rewritten with the marks of this session only: coming back to a result (after
    reviewing another, or reopening the project) erased the marks made before, and the Mark column was empty."""
    first = write_result(str(tmp_path / "first.gpkg"))
    other = write_result(str(tmp_path / "other.gpkg"))
    tab = dock.review_tab
    tab.review(first)
    for row in range(2):
        tab.form.polygonsTable.selectRow(row)
        tab.mark("correct")
    path = tab.corrections_path()
    assert saved_marks(path) == [(2, "correct"), (4, "correct")]
    tab.review(other)
    tab.review(first)
    assert table_column(tab, 3)[:3] == ["correct", "correct", ""]
    assert "2 marked earlier" in tab.form.reviewStatusLabel.text()
    tab.form.polygonsTable.selectRow(0)
    tab.mark("deleted")
    assert saved_marks(path) == [(2, "correct"), (4, "deleted")]

    source = first.source()
    project = QgsProject.instance()
    project.write(str(tmp_path / "p.qgz"))
    project.clear()
    project.read(str(tmp_path / "p.qgz"))
    reopened = next(layer for layer in project.mapLayers().values() if layer.source() == source)
    tab.review(reopened)
    assert table_column(tab, 3)[:3] == ["deleted", "correct", ""]
    # A marked polygon hidden by "Hide low quality" keeps its mark when another is marked.
    tab.form.qualitySpin.setValue(0.5)
    tab.form.hideLowCheck.setChecked(True)
    tab.show_layer()
    tab.form.polygonsTable.selectRow(0)
    tab.mark("correct")
    assert table_column(tab, 0)[0] == "0.55"
    assert saved_marks(path) == [(2, "correct"), (3, "correct"), (4, "deleted")]


def test_an_unreadable_review_file_is_said_and_never_written_over(dock, tmp_path):
    layer = write_result(str(tmp_path / "result.gpkg"))
    damaged = tmp_path / "result_review.gpkg"
    damaged.write_bytes(b"not a GeoPackage: the analyst's marks were in here")
    tab = dock.review_tab
    tab.review(layer)
    said = tab.form.reviewStatusLabel.text()
    assert said.startswith(f"The review file {damaged} cannot be read") and "left as it is" in said
    tab.form.polygonsTable.selectRow(0)
    tab.mark("correct")
    assert tab.form.reviewStatusLabel.text() == said
    assert damaged.read_bytes() == b"not a GeoPackage: the analyst's marks were in here"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".review-")]


def saved_rows(path) -> list[tuple[int, str, float]]:
    layer = QgsVectorLayer(f"{path}|layername=review", "review", "ogr")
    return sorted((f["source_fid"], f["status"], f.geometry().boundingBox().xMinimum()) for f in layer.getFeatures())


def test_a_result_written_again_to_the_same_file_does_not_take_the_old_polygons_marks(dock, tmp_path):
    """Another run written to the same file (Processing's fixed output, `segment --overwrite`) numbers its
    polygons from 1 again: the old marks were shown on the new polygons and the next mark saved them with the
    new polygons' shapes (a relabel of a road landing on a field, in the training labels)."""
    path = str(tmp_path / "result.gpkg")
    project = QgsProject.instance()
    first = write_result(path)
    tab = dock.review_tab
    tab.review(first)
    tab.form.polygonsTable.selectRow(0)
    tab.mark("correct")
    tab.form.polygonsTable.selectRow(1)
    tab.mark("relabelled", "parking lot")
    review = tab.corrections_path()
    old = saved_rows(review)
    assert [(fid, status) for fid, status, _ in old] == [(2, "relabelled"), (4, "correct")]
    project.removeMapLayer(first.id())
    os.remove(path)
    again = write_result(path, west=600000)  # the same file name, other polygons, the same feature ids
    tab.review(again)
    assert table_column(tab, 3) == [""] * 5
    said = tab.form.reviewStatusLabel.text()
    assert "marked earlier" not in said and "2 saved marks are of polygons this layer no longer has" in said
    tab.form.polygonsTable.selectRow(0)  # fid 4 again, now a polygon at x 600300
    tab.mark("deleted")
    assert saved_rows(review) == sorted([*old, (4, "deleted", 600300.0)])
    # The first polygons back in the file: their marks are theirs again.
    project.removeMapLayer(again.id())
    os.remove(path)
    tab.review(write_result(path))
    assert table_column(tab, 3)[:2] == ["correct", "relabelled: parking lot"]
    assert "2 marked earlier" in tab.form.reviewStatusLabel.text()
    assert "1 saved mark is of a polygon this layer no longer has" in tab.form.reviewStatusLabel.text()
