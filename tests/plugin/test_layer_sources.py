"""Layers the backend cannot read as they are: a CRS set in QGIS, /vsizip/ and other GDAL sources, WMS/XYZ
without tiles, views beyond the CRS's range, Processing outputs and temporary copies."""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from osgeo import gdal
from plugin_helpers import NAIP, RecordingFeedback, added, run_dock_job, subdataset, translated, xyz_source, zipped
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsRectangle,
    QgsVectorLayer,
)

CLASS_TEXT = "water\ngrass"


def report_of(vector: QgsVectorLayer) -> dict:
    return json.loads(Path(vector.source().split("|")[0]).with_suffix(".report.json").read_text("utf-8"))


@pytest.fixture
def dock(running_plugin, plugin_settings, tiny_model, qgis_new_project):
    plugin_settings()
    dock = running_plugin.create_dock()
    dock.form.classesEdit.setPlainText(CLASS_TEXT)
    dock.form.modelCombo.setEditText(str(tiny_model))
    dock.form.classRasterCheck.setChecked(False)
    dock.form.probRasterCheck.setChecked(False)
    return dock


def segment(dock, layer, extent="layer") -> QgsVectorLayer:
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData(extent))
    assert run_dock_job(dock) == "done", dock.last_error
    return dock.last_layers[0]


def test_a_crs_set_in_qgis_is_the_crs_the_polygons_are_in(dock, tmp_path, qgis_iface):
    """The file says EPSG:26913 (the wrong zone, 456 km off) or nothing; the analyst set EPSG:26914 with
    Layer > Set CRS. The polygons lie on the layer where QGIS shows it, for the whole layer and the canvas."""
    utm14 = QgsCoordinateReferenceSystem("EPSG:26914")
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(utm14)
    no_crs = gdal.GetDriverByName("GTiff").CreateCopy(str(tmp_path / "no_crs.tif"), gdal.Open(str(NAIP)))
    no_crs.SetProjection("")
    no_crs = None
    for name in ("wrong_zone.tif", "no_crs.tif"):
        path = translated(tmp_path, name, outputSRS="EPSG:26913") if name == "wrong_zone.tif" else str(tmp_path / name)
        layer = added(path, name)
        layer.setCrs(utm14)
        whole = segment(dock, layer)
        assert whole.crs() == utm14, name
        assert layer.extent().buffered(1.0).contains(whole.extent()), (name, whole.extent().toString())
        view = QgsRectangle(layer.extent())
        view.scale(0.5)
        canvas.setExtent(view)
        part = segment(dock, layer, "canvas")
        assert part.crs() == utm14
        assert canvas.extent().intersect(layer.extent()).buffered(10.0).contains(part.extent()), name
        assert part.extent().height() < 0.7 * layer.extent().height()


def test_gdal_sources_that_are_not_plain_files_keep_masks_band_roles_and_extra_bands(dock, tmp_path):
    """Inside a zip: a per-dataset mask (left half masked), RGB+NIR with NIR 0 on the left half (NIR is no alpha
    band), and a uint16 raster stored blue, green, red, alpha. Each is segmented exactly like the plain file."""
    masked = translated(tmp_path, "masked.tif", bandList=[1, 2, 3])
    dataset = gdal.Open(masked, gdal.GA_Update)
    gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", "YES")  # inside the file, so that it is zipped with it
    dataset.CreateMaskBand(gdal.GMF_PER_DATASET)
    gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    mask = dataset.GetRasterBand(1).GetMaskBand()
    width, height = dataset.RasterXSize, dataset.RasterYSize
    mask.WriteRaster(0, 0, width, height, bytes(([0] * (width // 2) + [255] * (width - width // 2)) * height))
    dataset = None
    nir_zero = translated(tmp_path, "nir_zero.tif")
    dataset = gdal.Open(nir_zero, gdal.GA_Update)
    dataset.GetRasterBand(4).WriteRaster(0, 0, width // 2, height, bytes(width // 2 * height))
    dataset = None
    bgra = str(NAIP.parent / "RGBA.uint16.tif")
    for plain in (masked, nir_zero, bgra):
        direct = report_of(segment(dock, added(plain, "direct")))
        inside = segment(dock, added(zipped(plain) if plain != bgra else zipped(_copy(bgra, tmp_path)), "zipped"))
        report = report_of(inside)
        assert report["valid_pixels"] == direct["valid_pixels"], plain
        assert report["bands"] == direct["bands"], plain
        assert report["pixel_window"] == direct["pixel_window"], plain
    assert direct["bands"] == [3, 2, 1]


def _copy(path: str, tmp_path: Path) -> str:
    target = str(tmp_path / os.path.basename(path))
    with open(path, "rb") as source, open(target, "wb") as copy:
        copy.write(source.read())
    return target


def test_a_large_gdal_layer_reaches_the_backend_at_its_own_resolution(bare_dock, tmp_path):
    """A 9340 x 7230 px virtual raster in a zip is not shrunk to 8192 px (the cap is for WMS/XYZ layers)."""
    huge = str(tmp_path / "huge.vrt")
    assert gdal.Translate(huge, str(NAIP), format="VRT", widthPct=1000, heightPct=1000) is not None
    layer = added(zipped(huge), "huge")
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.classesEdit.setPlainText(CLASS_TEXT)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    request, prepare = bare_dock.build_request()
    prepare(None, request)
    copy = gdal.Open(request["raster"])
    assert (copy.RasterXSize, copy.RasterYSize) == (layer.width(), layer.height()) == (9340, 7230)
    assert copy.GetGeoTransform() == pytest.approx(gdal.Open(huge).GetGeoTransform())


def test_a_world_view_in_wgs84_segments_the_raster_it_shows(dock, qgis_iface, qgis_new_project):
    """The canvas in EPSG:4326 zoomed out beyond +-180 degrees: the request's bbox is the raster's extent in
    its own CRS, and the run covers the raster."""
    layer = added(str(NAIP), "naip")
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    canvas.setExtent(QgsRectangle(-180, -90, 180, 90))
    assert canvas.extent().xMinimum() < -180
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("canvas"))
    request = dock.build_request()[0]
    assert request["bbox_crs"] == "EPSG:26914"
    assert QgsRectangle(*request["bbox"]) == layer.extent()
    vector = segment(dock, layer, "canvas")
    assert report_of(vector)["pixel_window"]["width"] == layer.width()


def test_an_empty_map_gives_a_sentence_and_whole_layer_needs_no_map(bare_dock, tmp_path, qgis_iface, monkeypatch):
    """Before the map shows anything its extent cannot be transformed: 'Whole layer' of a zipped GeoTIFF
    still works, 'Map canvas' says what to do."""
    from qgis_farslip.dock import UserError

    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    # What a map that has shown nothing yet says (QGIS then cannot transform it: QgsCsException).
    monkeypatch.setattr(canvas, "extent", lambda: QgsRectangle())
    layer = added(zipped(_copy(str(NAIP), tmp_path)), "zipped")
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.classesEdit.setPlainText(CLASS_TEXT)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    request, prepare = bare_dock.build_request()
    prepare(None, request)
    assert gdal.Open(request["raster"]).RasterXSize == layer.width()
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("canvas"))
    with pytest.raises(UserError, match="cannot be taken into the CRS of the raster zipped"):
        bare_dock.build_request()


def on_web_tiles(dock, tmp_path, qgis_iface, name: str) -> None:
    """The dock set to segment the map's view of an XYZ layer (whose tile folder is empty)."""
    layer = added(xyz_source(tmp_path), name, "wms")
    canvas = qgis_iface.mapCanvas()
    canvas.resize(800, 600)
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(QgsRectangle(-11044000, 5942000, -11034000, 5946000))
    dock.form.layerCombo.setLayer(layer)
    dock.form.extentCombo.setCurrentIndex(dock.form.extentCombo.findData("canvas"))


def test_an_xyz_layer_without_tiles_says_so_without_naming_a_temporary_file(dock, tmp_path, qgis_iface):
    on_web_tiles(dock, tmp_path, qgis_iface, "empty tiles")
    assert run_dock_job(dock) == "failed"
    assert dock.last_error.startswith("The layer empty tiles returned no imagery for this extent"), dock.last_error
    assert tempfile.gettempdir() not in dock.last_error


def farslip_temporaries() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "farslip-*")))


def test_processing_reads_a_zipped_layer_with_its_crs_and_leaves_no_temporary_copy(
        running_plugin, qgis_processing, tiny_model, tmp_path, qgis_new_project):
    import processing

    path = translated(tmp_path, "wrong_zone.tif", outputSRS="EPSG:26913")
    layer = added(zipped(path), "zipped")
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:26914"))
    extent = QgsRectangle(layer.extent())
    extent.scale(0.5)
    before = farslip_temporaries()
    out = tmp_path / "zipped.gpkg"
    processing.run("farslip:segment_by_class_names", {
        "INPUT": layer, "EXTENT": extent, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model),
        "REGION_CHECKS": False, "OUTPUT": str(out)})
    assert farslip_temporaries() == before
    vector = QgsVectorLayer(str(out), "zipped", "ogr")
    assert vector.crs().authid() == "EPSG:26914"
    assert extent.buffered(10.0).contains(vector.extent()), vector.extent().toString()
    # The polygons follow the layer's own pixel edges (no resampled copy of the extent).
    x_min = vector.extent().xMinimum()
    assert (x_min - layer.extent().xMinimum()) / layer.rasterUnitsPerPixelX() == pytest.approx(
        round((x_min - layer.extent().xMinimum()) / layer.rasterUnitsPerPixelX()), abs=1e-6)


def test_processing_save_to_geopackage_writes_the_layer_named_after_the_file_and_keeps_the_others(
        running_plugin, qgis_processing, naip_layer, tiny_model, tmp_path):
    """The backend names its layer after the file: 'Save to GeoPackage...' with another table name writes that
    layer (said in a warning) and returns it; into an existing GeoPackage it is added beside the others, and
    refused where it would replace a layer of the file's name the user did not choose."""
    import sqlite3

    import processing
    from qgis.core import QgsProcessingException

    new = tmp_path / "dossier ü" / "new.gpkg"
    new.parent.mkdir()
    feedback = RecordingFeedback()
    result = processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model), "REGION_CHECKS": False,
        "OUTPUT": f"ogr:dbname='{new}' table=\"landcover\" (geom)"}, feedback=feedback)
    assert result["OUTPUT"] == f"{new}|layername=new"
    assert QgsVectorLayer(result["OUTPUT"], "new", "ogr").featureCount() > 0
    assert f"The layer in {new} is named 'new' after the file (not 'landcover')." in feedback.warnings
    project = tmp_path / "project.gpkg"
    project.write_bytes(new.read_bytes())  # holds a layer 'new'
    result = processing.run("farslip:segment_by_class_names", {
        "INPUT": naip_layer, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model), "REGION_CHECKS": False,
        "OUTPUT": f"ogr:dbname='{project}' table=\"landcover\" (geom)"})
    assert result["OUTPUT"] == f"{project}|layername=project"
    with sqlite3.connect(project) as db:
        assert sorted(row[0] for row in db.execute("SELECT table_name FROM gpkg_contents")) == ["new", "project"]
    same_name = tmp_path / "elsewhere" / "new.gpkg"
    same_name.parent.mkdir()
    same_name.write_bytes(new.read_bytes())
    with pytest.raises(QgsProcessingException, match=r"would replace its layer 'new', not create 'landcover'"):
        processing.run("farslip:segment_by_class_names", {
            "INPUT": naip_layer, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model), "REGION_CHECKS": False,
            "OUTPUT": f"ogr:dbname='{same_name}' table=\"landcover\" (geom)"})
    assert same_name.read_bytes() == new.read_bytes()
    # A file that cannot be read as a GeoPackage (locked, damaged): the check cannot be made, so no write is risked
    # (it was taken for one without layers, and the write went ahead).
    unreadable = tmp_path / "Job #3" / "new.gpkg"
    unreadable.parent.mkdir()
    unreadable.write_bytes(b"not a GeoPackage " * 64)
    with pytest.raises(QgsProcessingException, match=r"cannot be read .*, so FarSLIP cannot check"):
        processing.run("farslip:segment_by_class_names", {
            "INPUT": naip_layer, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model), "REGION_CHECKS": False,
            "OUTPUT": f"ogr:dbname='{unreadable}' table=\"landcover\" (geom)"})
    assert unreadable.read_bytes() == b"not a GeoPackage " * 64


def test_a_shapefile_export_of_a_long_class_name_keeps_that_class_styled(dock, tmp_path, qgis_new_project):
    long_name = "a very long class name " * 15
    dock.form.classesEdit.setPlainText(f"water\n{long_name}")
    vector = segment(dock, added(str(NAIP), "naip"))
    shapefile = dock.export_result(str(tmp_path / "export" / "long.shp"))
    assert shapefile is not None, dock.last_error
    assert "is stored shortened" in dock.form.statusLabel.text()
    exported = QgsVectorLayer(shapefile, "exported", "ogr")  # with the .qml beside it
    stored = {str(value) for value in exported.uniqueValues(exported.fields().indexOf("class"))}
    styled = {str(category.value()) for category in exported.renderer().categories()}
    assert stored <= styled, (stored, styled)
    assert {str(f["class"]) for f in vector.getFeatures()} != stored  # the name was shortened in the file


def test_a_re_run_with_other_classes_on_a_layer_read_through_a_vrt_says_features_cached(dock, tmp_path):
    """A GeoPackage raster table and a file whose CRS was set in QGIS reach the backend as a VRT: the second
    run with other classes reuses the image features of the first (the VRT is the same file both times)."""
    wrong_zone = added(translated(tmp_path, "wrong_zone.tif", outputSRS="EPSG:26913"), "wrong zone")
    wrong_zone.setCrs(QgsCoordinateReferenceSystem("EPSG:26914"))
    for layer in (added(subdataset(tmp_path), "table"), wrong_zone):
        dock.form.classesEdit.setPlainText(CLASS_TEXT)
        first = report_of(segment(dock, layer))
        assert not dock.form.statusLabel.text().endswith("; features cached."), layer.name()
        dock.form.classesEdit.setPlainText("forest, trees\nbuilding")
        second = report_of(segment(dock, layer))
        assert dock.form.statusLabel.text().endswith("; features cached."), (layer.name(),
                                                                             dock.form.statusLabel.text())
        assert second["pixel_window"] == first["pixel_window"]


def test_a_layers_vrt_is_kept_and_rewritten_only_when_its_content_changes(bare_dock, tmp_path, backend_home,
                                                                         monkeypatch):
    """The VRT of a zipped layer lies in the cache folder, at the same path on every run and for every QGIS
    session; written again unchanged it keeps its mtime and inode (what the backend's caches see); another CRS
    is another VRT; a changed source rewrites it. Unused VRTs are removed by age and beyond a count."""
    from qgis_farslip import extent

    def prepared(layer) -> str:
        bare_dock.form.layerCombo.setLayer(layer)
        request, prepare = bare_dock.build_request()
        prepare(None, request)
        return request["raster"]

    bare_dock.form.classesEdit.setPlainText(CLASS_TEXT)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    plain = _copy(str(NAIP), tmp_path)
    zipped_layer = added(zipped(plain), "zipped")
    path = prepared(zipped_layer)
    assert Path(path).parent == backend_home / "cache" / "layer-vrt"
    before = os.stat(path)
    assert prepared(added(zipped_layer.source(), "the same zip again")) == path
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (before.st_mtime_ns, before.st_ino, before.st_size)
    zipped_layer.setCrs(QgsCoordinateReferenceSystem("EPSG:26913"))
    other_crs = prepared(zipped_layer)
    assert other_crs != path and "26913" in gdal.Open(other_crs).GetProjection()
    assert gdal.Open(path).GetProjection() != gdal.Open(other_crs).GetProjection()

    smaller = translated(tmp_path, "smaller.tif", srcWin=[0, 0, 200, 100])
    os.replace(smaller, plain)
    zipped(plain)  # the same zip file, now holding a 200 x 100 raster
    assert prepared(added(zipped_layer.source(), "the changed zip")) == path
    assert os.stat(path).st_ino != before.st_ino
    assert (gdal.Open(path).RasterXSize, gdal.Open(path).RasterYSize) == (200, 100)

    folder = Path(path).parent
    now = time.time()
    stale = folder / f"stale-{'a' * 20}.vrt"  # not used for longer than the age limit
    older = folder / f"older-{'b' * 20}.vrt"  # used a day ago: removed as the least recently used beyond the count
    recent = folder / f"recent-{'c' * 20}.vrt"
    own = folder / "notes.vrt"  # not a name the plugin gives: never removed, however old
    for file, used in ((stale, now - extent.VRT_CACHE_MAX_AGE_S - 3600), (older, now - 86400), (recent, now),
                       (own, now - extent.VRT_CACHE_MAX_AGE_S - 3600)):
        file.write_text("<VRTDataset/>")
        os.utime(file, (used, used))
    draft = folder / ".draft-crashed.vrt"  # a draft a crash left behind
    draft.write_text("<VRTDataset")
    os.utime(draft, (now - 2 * 86400, now - 2 * 86400))
    monkeypatch.setattr(extent, "VRT_CACHE_MAX_FILES", 3)
    assert prepared(zipped_layer) == other_crs
    left = sorted(file.name for file in folder.iterdir())
    assert left == sorted([Path(other_crs).name, Path(path).name, recent.name, "notes.vrt"]), left


def test_the_copy_of_a_web_layer_says_so_and_stops_when_the_job_is_cancelled(dock, tmp_path, qgis_iface):
    """Tiles of a web layer may take minutes to fetch: the status says the layer is being copied, and Cancel
    reaches the copy (the job ends as cancelled, not as a failed copy)."""
    from qgis_farslip.jobs import JobCancelled

    on_web_tiles(dock, tmp_path, qgis_iface, "web tiles")
    request, prepare = dock.build_request()

    class Said:
        def __init__(self):
            self.jobs = []

        def emit(self, job):
            self.jobs.append(job)

    class CancelledTask:  # what prepare() sees of a JobTask the user cancelled
        jobUpdated = Said()

        @staticmethod
        def isCanceled():
            return True

    with pytest.raises(JobCancelled):
        prepare(CancelledTask, request)
    assert CancelledTask.jobUpdated.jobs[0]["message"].startswith("Copying web tiles (")


def test_a_web_layer_is_copied_with_square_pixels_whatever_the_maps_crs(bare_dock, tmp_path, qgis_iface):
    """A map in EPSG:4326 at 47 N shows an EPSG:3857 XYZ layer with pixels 1.5 times taller than wide in the
    layer's CRS: the copy was sized per axis, and the model saw a stretched image."""
    from qgis_farslip.extent import export_size, transform_extent

    layer = added(xyz_source(tmp_path), "tiles", "wms")
    canvas = QgsRectangle(-99.2, 46.975, -99.1, 47.075)  # 0.1 x 0.1 degrees on a 600 x 600 px map
    in_layer = transform_extent(canvas, QgsCoordinateReferenceSystem("EPSG:4326"), layer.crs())
    width, height = export_size(layer, in_layer, in_layer, (600, 600))
    assert in_layer.width() / width == pytest.approx(in_layer.height() / height, rel=0.01), (width, height)
    assert max(width, height) >= 600, "at least the map's own detail"


def test_whole_layer_of_a_web_map_is_refused_in_words(bare_dock, tmp_path, qgis_iface):
    """'Whole layer' of an XYZ layer is the whole world, copied at up to 8192 px: 5 km pixels."""
    from qgis_farslip.dock import UserError

    layer = added(xyz_source(tmp_path), "web tiles", "wms")
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.classesEdit.setPlainText(CLASS_TEXT)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    with pytest.raises(UserError) as refused:
        bare_dock.build_request()
    assert str(refused.value) == ("The layer web tiles is a web map (WMS/XYZ): its whole extent cannot be copied for "
                                  "the backend; zoom the map to the area and choose 'Map canvas', or draw a "
                                  "rectangle.")
    assert bare_dock.runner._temporary_dirs == [], "no folder for a copy that is not made"


def test_processing_refuses_a_web_layer_without_an_extent(running_plugin, qgis_processing, tiny_model, tmp_path,
                                                          qgis_new_project):
    import processing
    from qgis.core import QgsProcessingException

    layer = added(xyz_source(tmp_path), "web tiles", "wms")
    said = ("The layer web tiles is a web map (WMS/XYZ): its whole extent cannot be copied for the backend; give "
            "the area to segment as Extent.")
    with pytest.raises(QgsProcessingException, match=f"^{re.escape(said)}$"):
        processing.run("farslip:segment_by_class_names", {
            "INPUT": layer, "CLASSES": CLASS_TEXT, "MODEL": str(tiny_model), "REGION_CHECKS": False,
            "OUTPUT": str(tmp_path / "web.gpkg")})
    assert not (tmp_path / "web.gpkg").exists()
