"""Export... and the files it could replace: a user's shapefile typed into the dialog, the result's own file,
a result whose file is gone, a GeoPackage without a styles table."""

from __future__ import annotations

import os

from plugin_helpers import memory_result, write_result_file
from qgis.core import (QgsApplication, QgsFeature, QgsGeometry, QgsPointXY, QgsProject, QgsVectorFileWriter,
                       QgsVectorLayer)
from qgis.PyQt.QtWidgets import QMessageBox

TWO = (("water", 0.2), ("forest", 0.9))


def result_layer(path: str, name: str = "water, forest 12:00:00") -> QgsVectorLayer:
    from qgis_farslip.results import categorized_renderer

    write_result_file(path, "EPSG:26914", TWO)
    layer = QgsVectorLayer(path, name, "ogr")
    layer.setRenderer(categorized_renderer([("water", 0), ("forest", 1)]))
    layer.setCustomProperty("farslip/run_id", "r1")
    QgsProject.instance().addMapLayer(layer)
    return layer


def survey_shapefile(path: str) -> None:
    points = QgsVectorLayer("Point?crs=EPSG:26914&field=name:string", "pts", "memory")
    feature = QgsFeature(points.fields())
    feature.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(1, 2)))
    feature.setAttributes(["my survey point"])
    points.dataProvider().addFeature(feature)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "ESRI Shapefile"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        points, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message


def names_in(path: str) -> list:
    """The class names of an exported result, or the name of the survey's point."""
    layer = QgsVectorLayer(path, "back", "ogr")
    field = "class" if layer.fields().indexOf("class") >= 0 else "name"
    return sorted(str(feature[field]) for feature in layer.getFeatures())


def type_in_dialog(monkeypatch, path: str, answers: list) -> list:
    """The analyst types `path` into the dialog's File box and presses OK; the replace question is answered
    from `answers` (and recorded)."""
    from qgis_farslip import exporting

    asked = []

    def typed_and_ok(dialog):
        dialog.fileWidget.setFilePath(path)
        return True

    def question(_parent, _title, text, *_args):
        asked.append(text)
        return answers.pop(0)

    monkeypatch.setattr(exporting.ExportDialog, "exec", typed_and_ok)
    monkeypatch.setattr(QMessageBox, "question", question)
    return asked


def test_a_shapefile_typed_into_the_dialog_is_replaced_only_when_the_analyst_says_so(bare_dock, tmp_path,
                                                                                      monkeypatch):
    result = result_layer(str(tmp_path / "result.gpkg"))
    bare_dock.last_layers = [result]
    target = str(tmp_path / "survey.shp")
    survey_shapefile(target)
    (tmp_path / "survey.qix").write_bytes(b"the old spatial index")
    asked = type_in_dialog(monkeypatch, target, [QMessageBox.No, QMessageBox.Yes])

    assert bare_dock.export_result() is None
    assert asked == [f"{target} exists. Replace it (with its .dbf, .shx, .prj and style) by the exported result?"]
    assert bare_dock.form.statusLabel.text() == f"Not exported; {target} is unchanged."
    assert names_in(target) == ["my survey point"]

    assert bare_dock.export_result() == target, bare_dock.form.statusLabel.text()
    assert len(asked) == 2
    assert names_in(target) == ["forest", "water"]
    assert QgsVectorLayer(target, "back", "ogr").renderer().type() == "categorizedSymbol", "its .qml came along"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("survey", ".farslip"))) == [
        "survey.cpg", "survey.dbf", "survey.prj", "survey.qml", "survey.shp", "survey.shx"], \
        "the old spatial index (survey.qix) would describe the new file wrongly; no staged file is left"


def test_a_new_shapefile_or_a_geopackage_is_written_without_a_question(bare_dock, tmp_path, monkeypatch):
    result = result_layer(str(tmp_path / "result.gpkg"))
    bare_dock.last_layers = [result]
    asked = type_in_dialog(monkeypatch, str(tmp_path / "new.shp"), [])
    assert bare_dock.export_result() == str(tmp_path / "new.shp")
    type_in_dialog(monkeypatch, str(tmp_path / "result_copy"), [])
    assert bare_dock.export_result() == str(tmp_path / "result_copy.gpkg")
    assert asked == []


def test_an_export_never_replaces_what_it_reads(bare_dock, tmp_path):
    own = str(tmp_path / "r.gpkg")
    result = result_layer(own, name="r")  # its table is "r": the export's table would be "r" too
    assert bare_dock.export_result(own, result) is None
    assert bare_dock.form.statusLabel.text() == f"{own} is where r is read from; export it to another file."
    assert QgsVectorLayer(own, "back", "ogr").featureCount() == 2

    shapefile = str(tmp_path / "own.shp")
    assert bare_dock.export_result(shapefile, result) == shapefile
    from_shapefile = QgsVectorLayer(shapefile, "own", "ogr")
    from_shapefile.setRenderer(result.renderer().clone())
    assert bare_dock.export_result(shapefile, from_shapefile) is None
    assert bare_dock.form.statusLabel.text() == f"{shapefile} is where own is read from; export it to another file."
    assert names_in(shapefile) == ["forest", "water"]

    # Into its own GeoPackage under another table name: added beside it, the result itself untouched.
    result.setName("r copy")
    assert bare_dock.export_result(own, result) == own
    assert QgsVectorLayer(f"{own}|layername=r", "back", "ogr").featureCount() == 2
    assert QgsVectorLayer(f"{own}|layername=r_copy", "back", "ogr").featureCount() == 2


def test_a_result_whose_file_is_gone_is_not_offered_and_is_said_in_words(bare_dock, tmp_path):
    from qgis_farslip.exporting import ExportDialog

    kept = result_layer(str(tmp_path / "kept.gpkg"), name="kept")
    gone_path = str(tmp_path / "gone.gpkg")
    gone = result_layer(gone_path, name="gone")
    project = QgsProject.instance()
    project.write(str(tmp_path / "p.qgz"))
    project.clear()
    os.remove(gone_path)
    assert project.read(str(tmp_path / "p.qgz"))
    assert [layer.name() for layer in ExportDialog([], str(tmp_path)).layers] == ["kept"]
    gone = project.mapLayersByName("gone")[0]
    assert not gone.isValid()
    assert bare_dock.export_result(str(tmp_path / "out.gpkg"), gone) is None
    assert bare_dock.form.statusLabel.text() == (
        f"gone cannot be read (its file {gone_path} is gone or damaged); nothing to export.")
    assert not (tmp_path / "out.gpkg").exists()
    assert kept is not None


def test_an_export_into_a_geopackage_without_styles_logs_no_warning(bare_dock, tmp_path):
    from plugin_helpers import save_as_geopackage

    result = result_layer(str(tmp_path / "result.gpkg"))
    users = str(tmp_path / "users.gpkg")
    save_as_geopackage(memory_result("EPSG:26914"), users)
    logged = []

    def collect(message, _tag, _level):
        logged.append(message)

    QgsApplication.messageLog().messageReceived.connect(collect)
    try:
        assert bare_dock.export_result(users, result) == users, bare_dock.form.statusLabel.text()
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(collect)
    assert not [message for message in logged if "No styles available" in message], logged
    assert QgsVectorLayer(users, "back", "ogr").renderer() is not None
