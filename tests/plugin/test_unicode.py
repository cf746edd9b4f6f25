"""Class and layer names in any script, in real QGIS: legend, export round trip, file names."""

from __future__ import annotations

import os

import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant

NAMES = ["edifício", "建筑物", "건물", "здание", "مبنى", "Gebäude"]


def write_result(path: str) -> str:
    """A result GeoPackage as the backend writes it: one square per class, `class` and `class_id`."""
    memory = QgsVectorLayer("Polygon?crs=EPSG:32633", "result", "memory")
    provider = memory.dataProvider()
    provider.addAttributes([QgsField("class", QVariant.String), QgsField("class_id", QVariant.Int)])
    memory.updateFields()
    for class_id, name in enumerate(NAMES):
        feature = QgsFeature(memory.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(class_id * 10, 0, class_id * 10 + 8, 8)))
        feature.setAttributes([name, class_id])
        provider.addFeature(feature)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.fileEncoding = "GPKG", "UTF-8"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        memory, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message
    return path


@pytest.mark.parametrize(("text", "stem"), [
    ("건물 서울", "건물_서울"), ("edifício/Lisboa", "edifício_Lisboa"), ('a<b>:c"d|e?f*', "a_b_c_d_e_f"),
    ("CON", "_CON"), ("nul.tif", "_nul.tif"), ("  .. ", "result"), ("Gebäude\n", "Gebäude"),
    ("x" * 300, "x" * 80)])
def test_file_names_keep_every_script_and_are_safe_on_windows(farslip, text, stem):
    from qgis_farslip.filenames import safe_file_stem

    assert safe_file_stem(text) == stem


def test_legend_and_export_keep_class_names_in_any_script(farslip, qgis_new_project, tmp_path):
    from qgis_farslip.filenames import safe_file_stem
    from qgis_farslip.exporting import write_styled
    from qgis_farslip.results import load_segment_result

    gpkg = write_result(str(tmp_path / "result.gpkg"))
    job = {"id": "j1", "result": {"outputs": {"vector": gpkg}, "run_id": "r1",
                                  "classes": [{"class": n, "class_id": i} for i, n in enumerate(NAMES)]}}
    vector = load_segment_result(job, "FarSLIP 건물")[0]
    labels = [category.label() for category in vector.renderer().categories()]
    assert labels == NAMES
    assert QgsProject.instance().mapLayersByName("FarSLIP 건물") == [vector]
    for suffix in (".shp", ".gpkg"):
        path = str(tmp_path / (safe_file_stem(vector.name()) + suffix))
        write_styled(vector, path)
        back = QgsVectorLayer(path, "back", "ogr")
        assert back.isValid()
        assert sorted(f["class"] for f in back.getFeatures()) == sorted(NAMES)
        assert back.crs() == QgsCoordinateReferenceSystem("EPSG:32633")
    assert os.path.isfile(str(tmp_path / "FarSLIP_건물.cpg"))


def test_a_result_in_a_geopackage_with_other_layers_loads_its_own_layer(farslip, qgis_new_project, tmp_path):
    """The backend keeps a GeoPackage's other layers when it writes its result into it, and names its layer in
    the report: the dock opened the file's first layer (a project's roads) as the result."""
    from qgis_farslip.results import load_segment_result

    path = str(tmp_path / "project.gpkg")
    roads = QgsVectorLayer("LineString?crs=EPSG:32633&field=road:string", "roads", "memory")
    feature = QgsFeature(roads.fields())
    feature.setGeometry(QgsGeometry.fromWkt("LINESTRING (0 0, 10 10)"))
    feature.setAttributes(["A1"])
    roads.dataProvider().addFeature(feature)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", "roads"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        roads, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message
    write_result(str(tmp_path / "alone.gpkg"))
    result = QgsVectorLayer(str(tmp_path / "alone.gpkg"), "project", "ogr")
    options.layerName = "project"
    options.actionOnExistingFile = QgsVectorFileWriter.CreateOrOverwriteLayer
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        result, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message
    job = {"id": "j2", "result": {"outputs": {"vector": path}, "run_id": "r2", "layer": "project",
                                  "classes": [{"class": n, "class_id": i} for i, n in enumerate(NAMES)]}}
    vector = load_segment_result(job, "FarSLIP project")[0]
    assert vector.featureCount() == len(NAMES) and vector.fields().indexOf("class") >= 0
    assert sorted(f["class"] for f in vector.getFeatures()) == sorted(NAMES)


@pytest.mark.parametrize("name, table", [("gpkg tiles", "_gpkg_tiles"), ("sqlite stats", "_sqlite_stats"),
                                         ("rtree_index", "_rtree_index")])
def test_a_result_named_like_a_reserved_table_exports_to_a_geopackage(farslip, qgis_new_project, tmp_path, name,
                                                                      table):
    """GeoPackage reserves table names that begin with 'gpkg', 'rtree_' and 'sqlite_': the export of a layer named
    "gpkg tiles" failed; Processing's search result sqlite_hits.gpkg is layer _sqlite_hits, as the backend names it."""
    from qgis_farslip.exporting import write_styled
    from qgis_farslip.processing_provider import file_layer_name

    source = QgsVectorLayer(write_result(str(tmp_path / "result.gpkg")), name, "ogr")
    written = write_styled(source, str(tmp_path / "export.gpkg"))
    assert written.isValid() and written.featureCount() == len(NAMES)
    assert f"layername={table}" in written.source()
    assert file_layer_name(str(tmp_path / "sqlite_hits.gpkg")) == "_sqlite_hits"
    assert file_layer_name(str(tmp_path / "sqlite_hits.shp")) == "sqlite_hits"


def test_the_model_list_says_which_models_are_multilingual(farslip, qgis_iface, plugin_settings):
    from qgis.PyQt.QtCore import Qt

    from qgis_farslip.backend_manager import BackendManager
    from qgis_farslip.dock import FarslipDock

    plugin_settings()
    dock = FarslipDock(qgis_iface, BackendManager())
    try:
        dock.set_models({"default": "farslip2-vit-b-16", "models": [
            {"name": "farslip2-vit-b-16", "present": True, "languages": ["en"], "multilingual": False},
            {"name": "rs-m-clip", "present": True, "multilingual": True,
             "languages": ["en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]}]})
        combo = dock.form.modelCombo
        texts = {combo.itemData(i): combo.itemText(i) for i in range(combo.count())}
        assert "multilingual" in texts["rs-m-clip"] and "multilingual" not in texts["farslip2-vit-b-16"]
        row = combo.findData("rs-m-clip")
        assert "ko" in combo.itemData(row, Qt.ToolTipRole)
        # The class box takes any script.
        dock.form.classesEdit.setPlainText("건물, 빌딩\nedifício\nздание")
        assert dock.class_lines() == ["건물, 빌딩", "edifício", "здание"]
    finally:
        dock.close_down()
        dock.deleteLater()


def test_a_run_in_the_same_second_as_the_last_gets_its_own_file_names(farslip, tmp_path):
    from qgis_farslip.parameters import output_stem

    first = output_stem(str(tmp_path), "naip", "20261123-203930")
    assert first == str(tmp_path / "naip_20261123-203930")
    (tmp_path / "naip_20261123-203930.gpkg").write_text("first run")
    second = output_stem(str(tmp_path), "naip", "20261123-203930")
    assert second == str(tmp_path / "naip_20261123-203930-2")
    (tmp_path / ".naip_20261123-203930-2_classes.farslip-1-ab.tmp.tif").write_text("a run still writing")
    assert output_stem(str(tmp_path), "naip", "20261123-203930") == str(tmp_path / "naip_20261123-203930-3")
    assert output_stem(str(tmp_path), "naip", "20261123-203931") == str(tmp_path / "naip_20261123-203931")
