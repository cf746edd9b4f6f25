"""The Search tab end to end: the plugin's own backend indexes a shared raster, the hits layer and list appear."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from osgeo import gdal, osr
from plugin_helpers import NAIP, added, run_dock_job, subdataset, translated, wait_until, zipped
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

UTM14 = QgsCoordinateReferenceSystem("EPSG:26914")  # NAIP's CRS


@pytest.fixture
def search_tab(running_plugin, plugin_settings, naip_layer, tiny_model):
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.modelCombo.setEditText(str(tiny_model))
    tab = dock.search_tab
    tab.form.searchRasterCombo.setLayer(naip_layer)
    tab.form.topSpin.setValue(5)
    return tab


def run_search(tab, like=None, timeout: float = 240.0) -> str:
    states = []
    tab.searchFinished.connect(states.append)
    try:
        tab.search(like=like)
        wait_until(lambda: states, timeout, "the search to finish")
    finally:
        tab.searchFinished.disconnect(states.append)
    return states[0]


def test_search_tab_loads_a_ranked_hits_layer_and_zooms_to_a_hit(search_tab, naip_layer, qgis_iface):
    dock = search_tab.dock
    tabs = dock.form.tabs
    assert "Search" in [tabs.tabText(i) for i in range(tabs.count())]
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error

    layer = search_tab.hits_layer
    assert isinstance(layer, QgsVectorLayer) and layer.isValid()
    assert layer.crs() == naip_layer.crs()
    assert layer.featureCount() == 5
    assert [f["rank"] for f in layer.getFeatures()] == [1, 2, 3, 4, 5]
    assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
    assert layer.renderer().classAttribute() == "score"
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"
    assert layer.id() in QgsProject.instance().mapLayers()
    assert naip_layer.extent().buffered(1.0).contains(layer.extent())

    hits = search_tab.form.hitsList
    assert hits.count() == 5 and hits.item(0).text().startswith("1.")
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(naip_layer.crs())
    canvas.setExtent(naip_layer.extent())
    second = hits.item(1)
    hits.setCurrentItem(second)
    search_tab.zoom_to_hit(second)
    second_feature = next(f for f in layer.getFeatures() if f["rank"] == 2)
    hit_box = search_tab.hit_rectangle(second)
    assert hit_box.toString(0) == second_feature.geometry().boundingBox().toString(0)
    assert canvas.extent().contains(hit_box)
    assert canvas.extent().area() < naip_layer.extent().area() / 2
    assert abs(canvas.extent().center().x() - hit_box.center().x()) < 10
    assert abs(canvas.extent().center().y() - hit_box.center().y()) < 10

    search_tab.use_hit_as_extent()
    rectangle, crs = dock.drawn_extent
    assert crs == naip_layer.crs()
    assert rectangle.toString(0) == hit_box.toString(0)
    assert dock.extent.pixel_window(naip_layer) is None  # north up: the hit is its box, sent as the bbox
    assert dock.form.extentCombo.currentData() == "drawn"
    assert dock.form.tabs.currentIndex() == 0 and dock.form.layerCombo.currentLayer() == naip_layer


def test_query_by_example_from_a_map_click(search_tab, naip_layer, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(naip_layer.crs())
    centre = naip_layer.extent().center()
    search_tab.form.likeButton.setChecked(True)
    assert canvas.mapTool() is search_tab.point_tool
    states = []
    search_tab.searchFinished.connect(states.append)
    search_tab.point_tool.canvasClicked.emit(QgsPointXY(centre.x(), centre.y()), 1)
    wait_until(lambda: states, 240, "the search by example to finish")
    assert states == ["done"], search_tab.last_error
    assert not search_tab.form.likeButton.isChecked()
    layer = search_tab.hits_layer
    assert layer.featureCount() == 5
    assert all(not f.geometry().contains(QgsPointXY(centre.x(), centre.y())) for f in layer.getFeatures())
    assert all(f["query"].startswith("like ") for f in layer.getFeatures())


def test_a_click_off_the_raster_is_said_in_the_maps_words_before_any_job(search_tab, naip_layer, qgis_iface):
    """Not the backend's coordinates in the raster's CRS and its file name: the layer the user searches."""
    from qgis.core import QgsCoordinateReferenceSystem

    from qgis_farslip.search_tab import UserError

    with pytest.raises(UserError) as refused:
        search_tab.build_request(like=(10.0, 10.0, QgsCoordinateReferenceSystem("EPSG:4326")))
    assert str(refused.value) == (f"The clicked place lies outside the raster {naip_layer.name()}; click on the "
                                  "raster, or choose the layer to search there.")
    centre = naip_layer.extent().center()
    request, _prepare, _out = search_tab.build_request(like=(centre.x(), centre.y(), naip_layer.crs()))
    assert request["like"] == [centre.x(), centre.y()]


def test_empty_sentence_is_a_message_not_a_job(search_tab):
    search_tab.form.sentencesEdit.setPlainText("   ")
    assert run_search(search_tab, timeout=10) == "failed"
    assert "Type a sentence" in search_tab.last_error
    assert search_tab.task is None


def rotated_copy(path: str, degrees: float) -> str:
    """NAIP on a grid turned by `degrees` (a geotransform with rotation terms), same pixels and pixel size."""
    source = gdal.Open(str(NAIP))
    x0, size, _b, y0, _d, _e = source.GetGeoTransform()
    turn = math.radians(degrees)
    copy = gdal.GetDriverByName("GTiff").CreateCopy(path, source)
    copy.SetGeoTransform((x0, size * math.cos(turn), size * math.sin(turn),
                          y0, size * math.sin(turn), -size * math.cos(turn)))
    copy = None
    return path


def with_crs(path: str, epsg: int) -> str:
    """The file at `path` labelled with another CRS (its pixels and geotransform as they are)."""
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    dataset = gdal.Open(path, gdal.GA_Update)
    dataset.SetProjection(srs.ExportToWkt())
    dataset = None
    return path


def rotated_layer(tmp_path, source: str) -> QgsRasterLayer:
    """NAIP turned by 30 degrees as `source` says: a file; a file that says EPSG:26913 (456 km off) whose CRS was
    set to EPSG:26914 in QGIS (Layer > Set CRS); a file inside a zip."""
    path = rotated_copy(str(tmp_path / "rotated.tif"), 30.0)
    if source == "a CRS set in QGIS":
        with_crs(path, 26913)
    layer = added(zipped(path) if source == "a zipped file" else path, "rotated")
    if source == "a CRS set in QGIS":
        layer.setCrs(UTM14)
    return layer


@pytest.mark.parametrize("source", ["a file", "a CRS set in QGIS", "a zipped file"])
def test_a_hit_on_a_rotated_raster_used_as_the_extent_segments_the_hit_and_not_its_envelope(search_tab, tmp_path,
                                                                                           source):
    """On a grid turned by 30 degrees a hit's envelope holds almost twice the hit, much of it raster around it:
    the segment run on the hit covers the hit's footprint and stops at its edges. Also for a layer the backend
    reads through its VRT (a CRS set in QGIS, a zipped file), whose hits lie on the layer where QGIS shows it; the
    Review tab knows that layer behind the VRT of the hit's pixels."""
    layer = rotated_layer(tmp_path, source)
    search_tab.form.searchRasterCombo.setLayer(layer)
    search_tab.form.topSpin.setValue(3)
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error
    assert search_tab.hits_layer.crs() == layer.crs() == UTM14
    assert layer.extent().buffered(1.0).contains(search_tab.hits_layer.extent())
    hits = search_tab.form.hitsList
    hits.setCurrentItem(hits.item(0))
    footprint = next(f for f in search_tab.hits_layer.getFeatures() if f["rank"] == 1).geometry()
    envelope = QgsGeometry.fromRect(footprint.boundingBox())
    assert envelope.area() > 1.5 * footprint.area()  # the corners of the envelope reach well beyond the hit

    search_tab.use_hit_as_extent()
    dock = search_tab.dock
    assert dock.form.layerCombo.currentLayer() is layer and dock.form.extentCombo.currentData() == "drawn"
    assert dock.extent.pixel_window(layer) is not None
    dock.form.classesEdit.setPlainText("water\ngrass")
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    assert run_dock_job(dock) == "done", dock.last_error
    assert dock.last_layers[0].crs() == UTM14
    polygons = QgsGeometry.unaryUnion([f.geometry() for f in dock.last_layers[0].getFeatures()])
    pixel = 5.0
    assert footprint.difference(polygons).area() < pixel ** 2, "the hit is not covered"
    outside = polygons.difference(footprint.buffer(pixel, 1)).area()
    assert outside < pixel ** 2, f"{outside / pixel ** 2:.0f} pixels segmented beyond the hit"
    # The run read a VRT of the hit's pixels: training on the result's corrections takes this layer again (not a
    # new layer of that VRT).
    assert dock.review_tab.layer() is dock.last_layers[0]
    assert dock.review_tab.source_raster() == (layer, "")


def found(tab) -> dict[tuple[str, str], float]:
    """The hits of the last search: (query, box to a centimetre) -> score."""
    return {(f["query"], f.geometry().boundingBox().toString(2)): f["score"] for f in tab.hits_layer.getFeatures()}


def among(hits: dict[tuple[str, str], float], reference: dict[tuple[str, str], float]) -> bool:
    """Every hit is a place of `reference` (a search for more places) with its score. Scores of near ties may
    differ in the fourth decimal between two indexes of the same pixels, and swap ranks."""
    return all(place in reference and abs(score - reference[place]) < 2e-3 for place, score in hits.items())


def segment_the_hit(tab, row: int = 0) -> QgsVectorLayer:
    """'Use this hit as the extent' on the hit in `row`, then Run in the Segment tab; the polygon layer."""
    hits = tab.form.hitsList
    hits.setCurrentItem(hits.item(row))
    tab.use_hit_as_extent()
    dock = tab.dock
    dock.form.classesEdit.setPlainText("water\ngrass")
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    assert run_dock_job(dock) == "done", dock.last_error
    return dock.last_layers[0]


def test_a_geopackage_raster_table_is_searched_through_its_kept_vrt(search_tab, naip_layer, tmp_path, backend_home):
    """NAIP's pixels as a GeoPackage raster table (GPKG:file:table, no file of its own): the search reads the
    table's kept VRT and finds the places it finds in the GeoTIFF, at the same coordinates; the table's VRT is
    the same file on a second search, and a hit used as the extent segments that hit of the table."""
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road\na parking lot")
    search_tab.form.topSpin.setValue(10)
    assert run_search(search_tab) == "done", search_tab.last_error
    in_the_geotiff = found(search_tab)

    table = added(subdataset(tmp_path), "table")
    search_tab.form.topSpin.setValue(5)
    search_tab.form.searchRasterCombo.setLayer(table)
    request, prepare, _out = search_tab.build_request()
    assert prepare is not None  # the VRT is written in the job's worker thread
    prepare(None, request)
    vrt = Path(request["raster"])
    assert vrt.parent == backend_home / "cache" / "layer-vrt"
    before = vrt.stat()
    assert run_search(search_tab) == "done", search_tab.last_error
    assert search_tab.hits_layer.crs() == table.crs() == naip_layer.crs()
    assert len(found(search_tab)) == 10 and among(found(search_tab), in_the_geotiff)
    assert table.extent().buffered(1.0).contains(search_tab.hits_layer.extent())
    after = vrt.stat()  # the search read that VRT, kept as it was (the backend's search index knows it again)
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)

    hit = search_tab.hit_rectangle(search_tab.form.hitsList.item(1))
    polygons = segment_the_hit(search_tab, 1)
    assert search_tab.dock.form.layerCombo.currentLayer() is table
    assert polygons.crs() == naip_layer.crs() and polygons.featureCount() > 0
    assert hit.buffered(5.0).contains(polygons.extent()), (hit.toString(), polygons.extent().toString())
    assert polygons.extent().width() > 0.8 * hit.width() and polygons.extent().height() > 0.8 * hit.height()


def test_a_crs_set_in_qgis_is_the_crs_of_the_hits_and_of_the_map_extent_and_the_clicked_place(
        search_tab, naip_layer, tmp_path, qgis_iface):
    """A GeoTIFF that says EPSG:26913 (the wrong zone, 456 km off) set to EPSG:26914 with Layer > Set CRS, a map
    in EPSG:4326 on part of it: searching the map's extent by sentence, and by a click on the map, finds the places
    found in NAIP itself (which is in EPSG:26914), in EPSG:26914 and in the map's view; a hit used as the
    extent segments that hit of the layer."""
    wrong_zone = added(translated(tmp_path, "wrong_zone.tif", outputSRS="EPSG:26913"), "wrong zone")
    wrong_zone.setCrs(UTM14)
    assert wrong_zone.extent() == naip_layer.extent()
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(wgs84)
    to_map = QgsCoordinateTransform(UTM14, wgs84, QgsProject.instance())
    part = QgsRectangle(naip_layer.extent())
    part.scale(0.6)
    canvas.setExtent(to_map.transformBoundingBox(part))
    view = to_map.transformBoundingBox(canvas.extent(), QgsCoordinateTransform.ReverseTransform)
    assert not view.contains(naip_layer.extent())
    search_tab.form.searchExtentCombo.setCurrentIndex(search_tab.form.searchExtentCombo.findData("canvas"))
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    click = to_map.transform(naip_layer.extent().center())

    expected = []
    for layer, top in ((naip_layer, 10), (wrong_zone, 5)):
        search_tab.form.searchRasterCombo.setLayer(layer)
        search_tab.form.topSpin.setValue(top)
        assert run_search(search_tab) == "done", search_tab.last_error
        by_sentence = found(search_tab)
        assert search_tab.hits_layer.crs() == UTM14
        # The windows that overlap the view along each axis by at least half their side: their centres are in it.
        centres = [f.geometry().boundingBox().center() for f in search_tab.hits_layer.getFeatures()]
        assert all(view.buffered(1.0).contains(centre) for centre in centres), (view.toString(), centres)
        assert run_search(search_tab, like=(click.x(), click.y(), wgs84)) == "done", search_tab.last_error
        by_example = found(search_tab)
        assert search_tab.hits_layer.crs() == UTM14
        assert naip_layer.extent().buffered(1.0).contains(search_tab.hits_layer.extent())
        assert all(not f.geometry().contains(QgsPointXY(naip_layer.extent().center()))
                   for f in search_tab.hits_layer.getFeatures())
        expected.append((by_sentence, by_example))
    (sentence_hits, example_hits), (sentence_places, example_places) = expected[1], expected[0]
    assert len(sentence_hits) == len(example_hits) == 5
    assert among(sentence_hits, sentence_places) and among(example_hits, example_places)

    hit = search_tab.hit_rectangle(search_tab.form.hitsList.item(0))
    polygons = segment_the_hit(search_tab, 0)
    rectangle, crs = search_tab.dock.drawn_extent
    assert crs == UTM14 and rectangle == hit
    assert polygons.crs() == UTM14 and polygons.featureCount() > 0
    assert hit.buffered(5.0).contains(polygons.extent()), (hit.toString(), polygons.extent().toString())
    assert polygons.extent().width() > 0.8 * hit.width() and polygons.extent().height() > 0.8 * hit.height()


def test_a_layer_gdal_does_not_read_is_refused_in_a_sentence(bare_dock, tmp_path):
    """An XYZ layer has no file or GDAL dataset to index: a sentence says what to do, no job starts."""
    (tmp_path / "tiles").mkdir()
    layer = added(f"type=xyz&url=file://{tmp_path}/tiles/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0", "tiles", "wms")
    tab = bare_dock.search_tab
    tab.form.searchRasterCombo.setLayer(layer)
    tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(tab, timeout=10) == "failed"
    assert tab.last_error.startswith("tiles is not a raster GDAL reads"), tab.last_error
    assert "GeoTIFF" in tab.last_error and tab.task is None


def test_a_map_view_off_the_raster_is_refused_as_the_segment_tab_refuses_it(bare_dock, naip_layer, qgis_iface):
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    crs, view = canvas.mapSettings().destinationCrs(), canvas.extent()  # the next tests' map, given back below
    canvas.setDestinationCrs(naip_layer.crs())
    east = naip_layer.extent()
    canvas.setExtent(QgsRectangle(east.xMaximum() + 100000, east.yMinimum(), east.xMaximum() + 110000,
                                  east.yMaximum()))
    bare_dock.manager.ensure = lambda: None  # no backend is started
    tab = bare_dock.search_tab
    tab.form.searchRasterCombo.setLayer(naip_layer)
    tab.form.sentencesEdit.setPlainText("a lake")
    combo = tab.form.searchExtentCombo
    chosen = combo.currentIndex()
    combo.setCurrentIndex(combo.findData("canvas"))
    try:
        assert run_search(tab, timeout=10) == "failed"
        assert tab.last_error == ("The chosen extent does not overlap the raster naip; pan the map to the raster or "
                                  "choose 'Whole layer'.")
    finally:
        combo.setCurrentIndex(chosen)
        canvas.setDestinationCrs(crs)
        canvas.setExtent(view)


def test_a_world_view_beyond_the_crs_range_searches_the_raster_as_segment_does(search_tab, naip_layer, qgis_iface):
    """A map in EPSG:4326 zoomed out beyond its range (-315..315 degrees) with the raster in view: the search covers
    the raster, sent as the part of the view on it in the raster's CRS (the view itself is no valid bbox)."""
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    crs, view = canvas.mapSettings().destinationCrs(), canvas.extent()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    canvas.setExtent(QgsRectangle(-315, -150, 315, 150))
    combo = search_tab.form.searchExtentCombo
    chosen = combo.currentIndex()
    combo.setCurrentIndex(combo.findData("canvas"))
    try:
        assert canvas.extent().xMinimum() < -180
        search_tab.form.sentencesEdit.setPlainText("a lake")
        request, _prepare, _out = search_tab.build_request()
        assert request["bbox_crs"] == naip_layer.crs().authid()
        sent = QgsRectangle(*request["bbox"])
        assert sent == naip_layer.extent(), (sent.toString(), naip_layer.extent().toString())
        assert run_search(search_tab) == "done", search_tab.last_error
        assert naip_layer.extent().buffered(1.0).contains(search_tab.hits_layer.extent())
    finally:
        combo.setCurrentIndex(chosen)
        canvas.setDestinationCrs(crs)
        canvas.setExtent(view)


def test_hits_still_zoom_after_the_hits_layer_is_removed_and_a_removed_raster_is_named(search_tab, naip_layer,
                                                                                       qgis_iface):
    """A user removes the hits layer, then clicks a hit: the map zooms to it (the hits' CRS was kept); with the
    searched raster removed too, 'use this hit as the extent' says so instead of raising."""
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    QgsProject.instance().removeMapLayer(search_tab.hits_layer.id())
    first = search_tab.form.hitsList.item(0)
    search_tab.zoom_to_hit(first)
    to_degrees = QgsCoordinateTransform(UTM14, canvas.mapSettings().destinationCrs(), QgsProject.instance())
    hit_centre = to_degrees.transform(search_tab.hit_rectangle(first).center())
    assert canvas.extent().contains(hit_centre)
    assert canvas.extent().width() < 0.05  # degrees: zoomed to the hit, not to metres read as degrees

    QgsProject.instance().removeMapLayer(naip_layer.id())
    search_tab.form.hitsList.setCurrentItem(first)
    before = search_tab.dock.drawn_extent  # the dock may hold an earlier test's drawing
    search_tab.use_hit_as_extent()
    assert "removed from the project" in search_tab.last_error
    assert search_tab.dock.drawn_extent == before


def test_a_failed_search_on_another_raster_leaves_the_listed_hits_on_their_own_raster(search_tab, naip_layer,
                                                                                      tmp_path):
    """Hits of NAIP are listed; a search of another raster then fails in the backend (all nodata). The list
    still shows NAIP's hits, so "use this hit as the extent" must put them on NAIP, not on the raster whose
    search failed (their coordinates are NAIP's)."""
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    assert run_search(search_tab) == "done", search_tab.last_error
    first = search_tab.form.hitsList.item(0)
    hit_box = search_tab.hit_rectangle(first)

    blank = added(translated(tmp_path, "blank.tif", scaleParams=[[0, 255, 0, 0]], noData=0), "blank")
    search_tab.form.searchRasterCombo.setLayer(blank)
    assert run_search(search_tab) == "failed"
    assert "nodata" in search_tab.last_error.lower(), search_tab.last_error
    assert search_tab.form.hitsList.count() == 5

    search_tab.form.hitsList.setCurrentItem(first)
    search_tab.use_hit_as_extent()
    dock = search_tab.dock
    rectangle, crs = dock.drawn_extent
    assert dock.form.layerCombo.currentLayer() == naip_layer
    assert crs == naip_layer.crs() and rectangle.toString(0) == hit_box.toString(0)


def test_a_raster_removed_while_its_search_runs_still_gets_its_hits(search_tab, naip_layer):
    """The searched layer removed from the project while the search ran: the finished search was thrown away
    with "wrapped C/C++ object of type QgsRasterLayer has been deleted"; its hits file was written all the same."""
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    states = []
    search_tab.searchFinished.connect(states.append)
    search_tab.search()
    assert search_tab.task is not None
    QgsProject.instance().removeMapLayer(naip_layer.id())
    wait_until(lambda: states, 240, "the search to finish")
    assert states == ["done"], search_tab.last_error
    layer = search_tab.hits_layer
    assert layer.isValid() and layer.featureCount() == 5 and layer.name() == "FarSLIP hits naip"
    assert QgsProject.instance().mapLayer(layer.id()) is not None
    assert layer.crs() == UTM14 and search_tab.form.hitsList.count() == 5
    said = search_tab.form.searchStatusLabel.text()
    assert said.startswith("5 hits; click one to zoom to it. The searched raster naip was removed from the "
                           "project while the search ran"), said
    search_tab.form.hitsList.setCurrentItem(search_tab.form.hitsList.item(0))
    search_tab.use_hit_as_extent()
    assert "removed from the project" in search_tab.last_error


def test_a_search_whose_project_was_closed_adds_no_hits_to_the_next_project(search_tab, naip_layer):
    """File > New (or another project opened) while a search runs: its hits layer was added to the new project,
    which has no such raster; the hits file is kept and said instead."""
    search_tab.form.sentencesEdit.setPlainText("a lake next to a road")
    states = []
    search_tab.searchFinished.connect(states.append)
    search_tab.search()
    assert search_tab.task is not None
    QgsProject.instance().clear()
    wait_until(lambda: states, 240, "the search to finish")
    assert states == ["done"], search_tab.last_error
    assert QgsProject.instance().mapLayers() == {} and search_tab.form.hitsList.count() == 0
    said = search_tab.form.searchStatusLabel.text()
    assert said.startswith("Done, but the project this search was started in was closed meanwhile"), said
    kept = said.split("The hits file is kept: ", 1)[1].split(". Add it", 1)[0]
    assert QgsVectorLayer(kept, "hits", "ogr").featureCount() == 5


def test_a_search_notice_says_what_the_search_tab_user_can_do(search_tab, naip_layer, qgis_iface):
    """A search of a small corner of the raster finds one place: the notice said '1 hits' and '"max_overlap": 0.5
    (raise it, ...)', a setting the Search tab does not have."""
    search_tab.form.topSpin.setValue(20)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(naip_layer.crs())
    e = naip_layer.extent()  # the map shows a small corner of the raster
    canvas.setExtent(QgsRectangle(e.xMaximum() - 3, e.yMaximum() - 3, e.xMaximum() + 500, e.yMaximum() + 500))
    search_tab.form.searchExtentCombo.setCurrentIndex(search_tab.form.searchExtentCombo.findData("canvas"))
    search_tab.form.sentencesEdit.setPlainText("a lake")
    assert run_search(search_tab) == "done", search_tab.last_error
    said = search_tab.form.searchStatusLabel.text()
    assert search_tab.form.hitsList.count() == 1
    assert said.startswith("1 hit; click one to zoom to it. 'a lake' has 1 hit, not the 20 asked for in Hits"), said
    assert "max_overlap" not in said and '"' not in said
