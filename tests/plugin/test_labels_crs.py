"""A CRS the analyst set in QGIS (Layer > Set CRS) on a label layer is the CRS the backend reads the labels in."""

from __future__ import annotations

import json
import os

from osgeo import ogr
from qgis.core import QgsCoordinateReferenceSystem, QgsVectorLayer

# Two squares in UTM 33N metres, as a GeoJSON without a "crs" member (which GeoJSON readers take as WGS 84).
SQUARES = [(500008.0, 4999912.0), (500104.0, 4999912.0)]


def write_utm_geojson_without_crs(path: str) -> None:
    features = [{"type": "Feature", "properties": {"cls": cls},
                 "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + 80, y], [x + 80, y + 80], [x, y + 80],
                                                                  [x, y]]]}}
                for cls, (x, y) in zip(("water", "forest"), SQUARES)]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"type": "FeatureCollection", "features": features}, handle)


def handed_file(layer: QgsVectorLayer, tmp_path) -> str:
    from qgis_farslip.train_tab import labels_file

    folder = tmp_path / "copy"
    return labels_file(layer, "cls", lambda: (folder.mkdir(exist_ok=True), str(folder))[1])


def file_crs_and_corners(path: str) -> tuple[str, list[tuple[float, float]]]:
    """What the backend sees in the file: its CRS (authority code) and each polygon's lower left corner."""
    dataset = ogr.Open(path)
    table = dataset.GetLayer(0)
    srs = table.GetSpatialRef()
    code = f"{srs.GetAuthorityName(None)}:{srs.GetAuthorityCode(None)}" if srs is not None else ""
    corners = []
    for feature in table:
        envelope = feature.GetGeometryRef().GetEnvelope()  # (min x, max x, min y, max y)
        corners.append((envelope[0], envelope[2]))
    return code, sorted(corners)


def assert_handed_in_the_crs_set(layer: QgsVectorLayer, tmp_path, source: str, why: str) -> None:
    """Layer > Set CRS EPSG:32633 on `layer` (file `source`): the backend gets a copy in that CRS."""
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32633"))
    handed = handed_file(layer, tmp_path)
    assert handed != source, why
    assert file_crs_and_corners(handed) == ("EPSG:32633", SQUARES)


def test_a_crs_set_in_qgis_on_a_geojson_reaches_the_backend(farslip, tmp_path):
    source = str(tmp_path / "utm_without_crs.geojson")
    write_utm_geojson_without_crs(source)
    layer = QgsVectorLayer(source, "labels", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:4326"  # GeoJSON's default, wrong for these metres
    assert_handed_in_the_crs_set(layer, tmp_path, source,
                                 "the file's own CRS (WGS 84) would place the labels off the earth")


def test_a_crs_set_in_qgis_on_a_shapefile_without_prj_reaches_the_backend(farslip, tmp_path):
    geojson = str(tmp_path / "squares.geojson")
    write_utm_geojson_without_crs(geojson)
    shapefile = str(tmp_path / "squares.shp")
    assert ogr.GetDriverByName("ESRI Shapefile").CopyDataSource(ogr.Open(geojson), shapefile) is not None
    if os.path.exists(str(tmp_path / "squares.prj")):
        os.remove(str(tmp_path / "squares.prj"))
    layer = QgsVectorLayer(shapefile, "labels", "ogr")
    assert layer.isValid()
    assert not layer.dataProvider().crs().isValid()
    # What the backend's refusal asks the user to do.
    assert_handed_in_the_crs_set(layer, tmp_path, shapefile,
                                 "the backend would refuse the file for having no CRS, which the user just set")


def test_a_file_in_its_own_crs_is_handed_as_it_is(farslip, tmp_path):
    source = str(tmp_path / "utm_without_crs.geojson")
    write_utm_geojson_without_crs(source)
    layer = QgsVectorLayer(source, "labels", "ogr")
    assert handed_file(layer, tmp_path) == source
