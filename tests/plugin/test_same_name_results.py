"""Two results of the same name (two runs in the same second, one preset at the same time of day): told apart in
the project, and an export into one GeoPackage keeps both; a result exported again replaces only its own table."""

from __future__ import annotations

from osgeo import ogr
from plugin_helpers import TWO_CLASSES, write_result_file
from qgis.core import QgsProviderRegistry, QgsVectorLayer

NAME = "water, forest 12:00:00"


def finished_job(path: str, run_id: str) -> dict:
    write_result_file(path, "EPSG:26914", TWO_CLASSES)
    classes = [{"class": "water", "class_id": 0, "polygons": 1}, {"class": "forest", "class_id": 1, "polygons": 1}]
    return {"id": run_id, "state": "done", "request": {"raster": ""},
            "result": {"run_id": run_id, "outputs": {"vector": path}, "classes": classes}}


def tables_of(path: str) -> dict[str, int]:
    return {sublayer.name(): QgsVectorLayer(f"{path}|layername={sublayer.name()}", "t", "ogr").featureCount()
            for sublayer in QgsProviderRegistry.instance().querySublayers(path)}


def test_two_runs_of_the_same_name_get_names_of_their_own(farslip, qgis_new_project, tmp_path):
    from qgis_farslip.results import load_segment_result

    first = load_segment_result(finished_job(str(tmp_path / "a.gpkg"), "r1"), NAME)[0]
    second = load_segment_result(finished_job(str(tmp_path / "b.gpkg"), "r2"), NAME)[0]
    third = load_segment_result(finished_job(str(tmp_path / "c.gpkg"), "r3"), NAME)[0]
    assert [first.name(), second.name(), third.name()] == [NAME, f"{NAME} (2)", f"{NAME} (3)"]


def test_an_export_into_a_geopackage_never_replaces_another_result_of_the_same_name(bare_dock, tmp_path):
    from qgis_farslip.results import load_segment_result

    first = load_segment_result(finished_job(str(tmp_path / "a.gpkg"), "r1"), NAME)[0]
    second = load_segment_result(finished_job(str(tmp_path / "b.gpkg"), "r2"), NAME)[0]
    second.setName(NAME)  # as a result of another project or session, loaded here, may be called
    second.dataProvider().deleteFeatures([next(second.getFeatures()).id()])
    out = str(tmp_path / "all results.gpkg")
    table = "water_forest_12_00_00"

    assert bare_dock.export_result(out, first) == out, bare_dock.last_error
    assert bare_dock.export_result(out, second) == out, bare_dock.last_error
    assert tables_of(out) == {table: 2, f"{table}_2": 1}
    assert bare_dock.form.statusLabel.text() == (
        f"Exported {NAME} with its style to {out} as the layer {table}_2; its other layers are kept. The GeoPackage "
        f"already had a layer {table} (another result, or one of yours); it is kept.")

    # Each result exported again replaces its own table, and only it.
    first.dataProvider().deleteFeatures([next(first.getFeatures()).id()])
    assert bare_dock.export_result(out, first) == out
    second.dataProvider().deleteFeatures([next(second.getFeatures()).id()])
    assert bare_dock.export_result(out, second) == out
    assert tables_of(out) == {table: 1, f"{table}_2": 0}


def test_an_export_keeps_the_users_table_of_the_same_name(bare_dock, tmp_path):
    from qgis_farslip.results import load_segment_result

    result = load_segment_result(finished_job(str(tmp_path / "a.gpkg"), "r1"), "roads")[0]
    users = str(tmp_path / "users.gpkg")
    source = ogr.GetDriverByName("GPKG").CreateDataSource(users)
    roads = source.CreateLayer("roads", None, ogr.wkbLineString)
    roads.CreateFeature(ogr.Feature(roads.GetLayerDefn()))
    source = roads = None
    assert bare_dock.export_result(users, result) == users, bare_dock.last_error
    assert tables_of(users) == {"roads": 1, "roads_2": 2}
