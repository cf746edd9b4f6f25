"""Exporting a result into a GeoPackage the analyst already has (a project's data): its layers are kept."""

from __future__ import annotations

import os
import sqlite3

from osgeo import ogr, osr
from plugin_helpers import write_result_file
from qgis.core import QgsApplication, QgsProject, QgsVectorLayer


def add_gpkg_layer(path: str, name: str, classes: tuple[str, ...]) -> None:
    driver = ogr.GetDriverByName("GPKG")
    source = driver.Open(path, 1) if os.path.exists(path) else driver.CreateDataSource(path)
    crs = osr.SpatialReference()
    crs.ImportFromEPSG(26914)
    layer = source.CreateLayer(name, crs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("class", ogr.OFTString))
    layer.CreateField(ogr.FieldDefn("class_id", ogr.OFTInteger))
    for index, name_ in enumerate(classes):
        feature = ogr.Feature(layer.GetLayerDefn())
        feature.SetField("class", name_)
        feature.SetField("class_id", index)
        low, high = index, index + 10
        feature.SetGeometry(ogr.CreateGeometryFromWkt(f"POLYGON((0 {low},10 {low},10 {high},0 {high},0 {low}))"))
        layer.CreateFeature(feature)
    source = None


def layers_of(path: str) -> list[str]:
    return sorted(layer.GetName() for layer in ogr.Open(path) if layer.GetName() != "layer_styles")


def styles_of(path: str) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as database:
        return sorted(database.execute("SELECT f_table_name, styleName FROM layer_styles").fetchall())


def test_export_into_an_existing_geopackage_keeps_its_layers_and_replaces_only_its_own(bare_dock, tmp_path):
    from qgis_farslip.results import categorized_renderer

    source = str(tmp_path / "result.gpkg")
    add_gpkg_layer(source, "result", ("water", "grass", "road"))
    result = QgsVectorLayer(source, "water, grass 12:00:00", "ogr")
    result.setRenderer(categorized_renderer([("water", 0), ("grass", 1), ("road", 2)]))
    result.setCustomProperty("farslip/run_id", "r1")
    QgsProject.instance().addMapLayer(result)
    bare_dock.last_layers = [result]

    project = str(tmp_path / "my_project.gpkg")
    add_gpkg_layer(project, "parcels", ("a", "b"))
    add_gpkg_layer(project, "roads", ("c",))
    parcels = QgsVectorLayer(f"{project}|layername=parcels", "parcels", "ogr")
    assert not parcels.saveStyleToDatabase("parcels style", "", True, "")

    assert bare_dock.export_result(project) == project, bare_dock.last_error
    table = "water_grass_12_00_00"
    assert layers_of(project) == sorted(["parcels", "roads", table]), "the export replaced the whole GeoPackage"
    status = bare_dock.form.statusLabel.text()
    assert f"as the layer {table}; its other layers are kept" in status, status
    assert QgsVectorLayer(f"{project}|layername=parcels", "p", "ogr").featureCount() == 2
    exported = QgsVectorLayer(f"{project}|layername={table}", "e", "ogr")
    assert exported.featureCount() == 3
    assert exported.renderer().type() == "categorizedSymbol", "the result's style is stored for its layer"
    assert [layer.name() for layer in QgsProject.instance().mapLayersByName(table)] == [table]

    # The same result again: only its own layer is replaced (no copy beside it), the other styles stay.
    result.dataProvider().deleteFeatures([next(result.getFeatures()).id()])
    assert bare_dock.export_result(project) == project, bare_dock.last_error
    assert layers_of(project) == sorted(["parcels", "roads", table])
    assert QgsVectorLayer(f"{project}|layername={table}", "e", "ogr").featureCount() == 2
    assert QgsVectorLayer(f"{project}|layername=roads", "r", "ogr").featureCount() == 1
    styles = styles_of(project)
    assert ("parcels", "parcels style") in styles
    assert [name for name, _style in styles].count(table) == 1, styles


def test_export_to_a_new_geopackage_writes_the_result_alone(bare_dock, tmp_path):
    from qgis_farslip.results import categorized_renderer

    source = str(tmp_path / "result.gpkg")
    add_gpkg_layer(source, "result", ("water",))
    result = QgsVectorLayer(source, "water 12:00:00", "ogr")
    result.setRenderer(categorized_renderer([("water", 0)]))
    result.setCustomProperty("farslip/run_id", "r1")
    QgsProject.instance().addMapLayer(result)
    bare_dock.last_layers = [result]
    path = str(tmp_path / "export" / "lakes.gpkg")
    logged = []

    def collect(message, _tag, _level):
        logged.append(message)

    QgsApplication.messageLog().messageReceived.connect(collect)
    try:
        assert bare_dock.export_result(path) == path
    finally:
        QgsApplication.messageLog().messageReceived.disconnect(collect)
    assert not [m for m in logged if "No styles available" in m], logged  # nothing to warn of in a new file
    assert layers_of(path) == ["water_12_00_00"]
    assert bare_dock.form.statusLabel.text() == f"Exported water 12:00:00 with its style to {path}."
    assert QgsProject.instance().mapLayersByName("lakes"), "a file of its own is shown under the file's name"
    assert QgsVectorLayer(path, "back", "ogr").renderer().type() == "categorizedSymbol"


def test_an_export_under_the_low_quality_filter_says_it_holds_only_the_polygons_shown(bare_dock, tmp_path):
    source = str(tmp_path / "result.gpkg")
    write_result_file(source, "EPSG:26914", (("water", 0.2), ("grass", 0.9), ("road", 0.1)))
    result = QgsVectorLayer(source, "result", "ogr")
    result.setCustomProperty("farslip/run_id", "r1")
    QgsProject.instance().addMapLayer(result)
    review = bare_dock.review_tab
    review.review(result)
    review.form.qualitySpin.setValue(0.5)
    review.form.hideLowCheck.setChecked(True)
    path = str(tmp_path / "export.gpkg")
    assert bare_dock.export_result(path, result) == path
    assert QgsVectorLayer(path, "back", "ogr").featureCount() == 1
    assert bare_dock.form.statusLabel.text() == (
        f"Exported result with its style to {path}. It holds 1 of the 3 polygons: those the layer's filter shows "
        f"({result.subsetString()}); turn 'Hide low quality' off (Review tab) or clear the filter to export them all.")


def test_an_export_with_nothing_shown_by_the_filter_says_0_not_minus_1(bare_dock, tmp_path):
    source = str(tmp_path / "result.gpkg")
    write_result_file(source, "EPSG:26914", (("water", 0.2), ("grass", 0.9), ("road", 0.1)))
    result = QgsVectorLayer(source, "result", "ogr")
    QgsProject.instance().addMapLayer(result)
    result.setSubsetString('"quality" >= 2')
    path = str(tmp_path / "none.gpkg")
    assert bare_dock.export_result(path, result) == path
    assert " It holds 0 of the 3 polygons: those the layer's filter shows" in bare_dock.form.statusLabel.text()


def test_export_refusals_are_sentences_and_an_upper_case_shapefile_is_styled(bare_dock, tmp_path):
    source = str(tmp_path / "result.gpkg")
    write_result_file(source, "EPSG:26914", (("water", 0.2), ("grass", 0.9)))
    result = QgsVectorLayer(source, "result", "ogr")
    QgsProject.instance().addMapLayer(result)
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    assert bare_dock.export_result(str(blocker / "sub" / "r.gpkg"), result) is None
    assert bare_dock.form.statusLabel.text().startswith(f"Cannot create the folder {blocker / 'sub'} (")
    impostor = tmp_path / "existing.gpkg"
    impostor.write_bytes(b"not a gpkg")
    assert bare_dock.export_result(str(impostor), result) is None
    assert bare_dock.form.statusLabel.text() == f"{impostor} exists and is not a GeoPackage; choose another file name."
    assert impostor.read_bytes() == b"not a gpkg"
    written = bare_dock.export_result(str(tmp_path / "R.SHP"), result)
    assert written == str(tmp_path / "R.shp"), bare_dock.form.statusLabel.text()
    assert sorted(p.name for p in tmp_path.glob("R.*")) == ["R.cpg", "R.dbf", "R.prj", "R.qml", "R.shp", "R.shx"]
    assert QgsVectorLayer(written, "back", "ogr").featureCount() == 2


def test_export_stays_offered_while_any_result_is_in_the_project(bare_dock, tmp_path):
    """Export... offers every FarSLIP result; removing the latest one while an older one remains left the button
    disabled (it followed the last run's layers only), and a project opened with results left it off."""
    results = []
    for name in ("older", "latest"):
        source = str(tmp_path / f"{name}.gpkg")
        write_result_file(source, "EPSG:26914", (("water", 0.2), ("grass", 0.9)))
        layer = QgsVectorLayer(source, name, "ogr")
        layer.setCustomProperty("farslip/run_id", name)
        results.append(layer)
    bare_dock.form.exportButton.setEnabled(False)
    QgsProject.instance().addMapLayers(results)
    assert bare_dock.form.exportButton.isEnabled()
    bare_dock.last_layers = [results[1]]
    QgsProject.instance().removeMapLayer(results[1].id())
    assert bare_dock.form.exportButton.isEnabled()
    QgsProject.instance().removeMapLayer(results[0].id())
    assert not bare_dock.form.exportButton.isEnabled()
