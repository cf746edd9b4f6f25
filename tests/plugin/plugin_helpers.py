"""Helpers of the plugin tests (importable from the test modules, unlike conftest)."""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

from qgis.core import (QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext, QgsProcessingFeedback,
                       QgsProject)

REPO = Path(__file__).resolve().parents[2]
NAIP = (REPO / ".." / "shared" / "data" / "naip_2020_5m.tif").resolve()
TWO_CLASSES = (("water", 0.2), ("forest", 0.3))  # a result's (class, quality) pairs
BACKEND_PYTHON = REPO / ".venv" / "bin" / "python"  # the backend's Python (QGIS's has no torch)


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    """Spin the Qt event loop until predicate() is true (tasks and QProcess need it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        QgsApplication.processEvents()
        time.sleep(0.02)


def run_dock_job(dock, timeout: float = 180.0) -> str:
    states = []
    dock.jobFinished.connect(states.append)
    try:
        dock.run()
        wait_until(lambda: states, timeout, "the job to finish")
    finally:
        dock.jobFinished.disconnect(states.append)
    return states[0]


def empty_dir(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def save_as_geopackage(layer, path: str) -> None:
    """Write a layer (a test's memory layer) to a GeoPackage file."""
    from qgis.core import QgsProject, QgsVectorFileWriter

    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        layer, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message


def users_roads_geopackage(path: str, crs: str, wkt: str) -> None:
    """A GeoPackage holding a user's own layer 'roads' (one line), which a job writing into the same file must keep."""
    from qgis.core import QgsFeature, QgsGeometry, QgsProject, QgsVectorFileWriter, QgsVectorLayer

    roads = QgsVectorLayer(f"LineString?crs={crs}&field=name:string", "roads", "memory")
    feature = QgsFeature(roads.fields())
    feature.setGeometry(QgsGeometry.fromWkt(wkt))
    feature.setAttributes(["main street"])
    roads.dataProvider().addFeatures([feature])
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", "roads"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        roads, path, QgsProject.instance().transformContext(), options)
    assert error == QgsVectorFileWriter.NoError, message


def memory_result(crs: str, classes: tuple[tuple[str, float], ...] = (("water", 0.2),)):
    """A segment result as the Review tab reads it, as a temporary (memory) layer: one 50 m square per (class,
    quality), 100 m apart, with a result's fields."""
    from qgis.core import QgsFeature, QgsField, QgsGeometry, QgsRectangle, QgsVectorLayer
    from qgis.PyQt.QtCore import QVariant

    memory = QgsVectorLayer(f"Polygon?crs={crs}", "result", "memory")
    provider = memory.dataProvider()
    provider.addAttributes([QgsField("class", QVariant.String), QgsField("class_id", QVariant.Int),
                            QgsField("area_m2", QVariant.Double), QgsField("quality", QVariant.Double)])
    memory.updateFields()
    for index, (name, quality) in enumerate(classes):
        feature = QgsFeature(memory.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(index * 100, 0, index * 100 + 50, 50)))
        feature.setAttributes([name, index, 2500.0, quality])
        provider.addFeature(feature)
    return memory


def write_result_file(path: str, crs: str, classes: tuple[tuple[str, float], ...] = (("water", 0.2),)) -> None:
    """A segment result's GeoPackage as the Review tab reads it (`memory_result` saved to `path`)."""
    save_as_geopackage(memory_result(crs, classes), path)


def review_loaded_result(dock, tmp_path, raster_path: str):
    """Load a finished segment job's result as the dock does, mark its polygons, train on the corrections;
    the request the Train tab would send, or None when training did not start."""
    from qgis.core import QgsRasterLayer
    from qgis_farslip.results import load_segment_result

    vector = str(tmp_path / "result.gpkg")
    write_result_file(vector, QgsRasterLayer(str(NAIP), "crs").crs().authid(), TWO_CLASSES)
    job = {"id": "job-1", "state": "done", "request": {"raster": raster_path, "out": vector},
           "result": {"outputs": {"vector": vector}, "run_id": "run-1",
                      "classes": [{"class": "water", "class_id": 0}, {"class": "forest", "class_id": 1}]}}
    result = load_segment_result(job, "water, forest 12:00:00")[0]
    tab = dock.review_tab
    tab.review(result)
    for row in range(2):
        tab.form.polygonsTable.selectRow(row)
        tab.mark("correct")
    started = []
    dock.train_tab.train = lambda: started.append(dock.train_tab.build_request()[0])
    tab.train_on_corrections()
    return started[0] if started else None


def translated(tmp_path: Path, name: str, **options) -> str:
    """A copy of NAIP made with gdal_translate's options."""
    from osgeo import gdal

    path = str(tmp_path / name)
    assert gdal.Translate(path, str(NAIP), **options) is not None
    return path


def zipped(path: str) -> str:
    """`path` inside a zip file, as QGIS opens it: /vsizip/."""
    archive = path + ".zip"
    with zipfile.ZipFile(archive, "w") as output:
        output.write(path, os.path.basename(path))
    return f"/vsizip/{archive}/{os.path.basename(path)}"


def subdataset(tmp_path: Path) -> str:
    """NAIP's red, green and blue as the second raster table of a GeoPackage, in lossless PNG tiles (the pixels
    of the file): a GDAL subdataset (GPKG:file:table), not a plain file."""
    from osgeo import gdal

    path = str(tmp_path / "tables.gpkg")
    for table, append in (("first", "NO"), ("naip", "YES")):
        assert gdal.Translate(path, str(NAIP), format="GPKG", bandList=[1, 2, 3],
                              creationOptions=[f"RASTER_TABLE={table}", f"APPEND_SUBDATASET={append}",
                                               "TILE_FORMAT=PNG"]) is not None
    return f"GPKG:{path}:naip"


def xyz_source(tmp_path: Path) -> str:
    """An XYZ layer whose tile folder is empty: it returns no imagery anywhere."""
    (tmp_path / "tiles").mkdir(exist_ok=True)
    return f"type=xyz&url=file://{tmp_path}/tiles/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0"


def added(source: str, name: str, provider: str = "gdal"):
    """A valid raster layer of `source`, added to the project."""
    from qgis.core import QgsProject, QgsRasterLayer

    layer = QgsRasterLayer(source, name, provider)
    assert layer.isValid(), source
    QgsProject.instance().addMapLayer(layer)
    return layer


class RecordingFeedback(QgsProcessingFeedback):
    """A Processing feedback that keeps the warnings and errors an algorithm reports."""

    def __init__(self):
        super().__init__()
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def pushWarning(self, text):
        self.warnings.append(text)
        super().pushWarning(text)

    def reportError(self, error, fatalError=False):
        self.errors.append(error)
        super().reportError(error, fatalError)


def start_algorithm(parameters: dict, name: str = "farslip:segment_by_class_names") -> dict:
    """The algorithm as a task in QGIS's task manager, as the Processing dialog runs it (its output to be loaded)."""
    algorithm = QgsApplication.processingRegistry().createAlgorithmById(name)
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    context.addLayerToLoadOnCompletion(parameters["OUTPUT"], QgsProcessingContext.LayerDetails(
        "Segmented polygons", QgsProject.instance(), "OUTPUT"))
    run = {"context": context, "feedback": RecordingFeedback(), "done": []}
    task = QgsProcessingAlgRunnerTask(algorithm, parameters, context, run["feedback"])
    task.executed.connect(lambda ok, results: run["done"].append((ok, results)))
    run["task"] = task
    QgsApplication.taskManager().addTask(task)
    return run


def run_result_layer(name: str, run_id: str, cls: str):
    """A one-polygon memory layer marked as the result of run `run_id` (class `cls`, styled by class), added to
    the project."""
    from qgis.core import QgsFeature, QgsGeometry, QgsProject, QgsVectorLayer

    from qgis_farslip.results import categorized_renderer

    layer = QgsVectorLayer("Polygon?crs=EPSG:26914&field=class:string&field=class_id:integer", name, "memory")
    feature = QgsFeature(layer.fields())
    feature.setGeometry(QgsGeometry.fromWkt("POLYGON((0 0,10 0,10 10,0 10,0 0))"))
    feature.setAttributes([cls, 0])
    layer.dataProvider().addFeature(feature)
    layer.setRenderer(categorized_renderer([(cls, 0)]))
    layer.setCustomProperty("farslip/run_id", run_id)
    QgsProject.instance().addMapLayer(layer)
    return layer
