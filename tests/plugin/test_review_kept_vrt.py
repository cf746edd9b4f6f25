""""Train on my corrections" of a result the backend read through a VRT the plugin keeps ($FARSLIP_CACHE/layer-vrt:
a CRS set in QGIS, a zipped file, a GeoPackage table, a search hit's window) whose layer is no longer in the
project: the Review tab adds that layer again (its dataset, with the CRS the VRT carries), never a layer of the
VRT, which the plugin removes when unused for 30 days or beyond 100 files; when it cannot, it says so."""

from __future__ import annotations

import os
import shutil

import pytest
from plugin_helpers import NAIP, subdataset, write_result_file, zipped
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
)

SET_CRS = "EPSG:26913"  # NAIP is in UTM zone 14; this layer's CRS was set in QGIS (Layer > Set CRS)


def review_result_of(dock, tmp_path, raster: str, crs: str):
    """A finished segment job's result on `raster` (the file the backend read), shown in the Review tab."""
    from qgis_farslip.results import load_segment_result

    vector = str(tmp_path / "result.gpkg")
    write_result_file(vector, crs)
    job = {"id": "job-1", "state": "done", "request": {"raster": raster, "out": vector},
           "result": {"outputs": {"vector": vector}, "run_id": "run-1", "classes": [{"class": "water", "class_id": 0}]}}
    dock.review_tab.review(load_segment_result(job, "water 12:00:00")[0])
    return dock.review_tab


def segmented_layer(tmp_path, source: str) -> tuple[QgsRasterLayer, str]:
    """The layer a run read through its kept VRT, and that VRT (written as the run wrote it)."""
    from qgis_farslip.extent import vrt_arguments, write_vrt

    path = str(tmp_path / "segmented.tif")
    shutil.copy(NAIP, path)
    name = {"a zipped file": zipped(path), "a GeoPackage table": subdataset(tmp_path)}.get(source, path)
    layer = QgsRasterLayer(name, "segmented")
    assert layer.isValid(), name
    if source == "a CRS set in QGIS":
        layer.setCrs(QgsCoordinateReferenceSystem(SET_CRS))
    return layer, write_vrt(*vrt_arguments(layer, window_of(source)))


def window_of(source: str):
    return (10, 20, 100, 80) if source == "a search hit's window" else None


def in_the_cache(path: str) -> bool:
    from qgis_farslip.extent import vrt_cache_dir

    return os.path.realpath(path).startswith(os.path.realpath(vrt_cache_dir()) + os.sep)


def raster_layers() -> list[QgsRasterLayer]:
    return [layer for layer in QgsProject.instance().mapLayers().values() if isinstance(layer, QgsRasterLayer)]


@pytest.mark.parametrize("source", ["a CRS set in QGIS", "a zipped file", "a GeoPackage table",
                                    "a search hit's window"])
def test_the_layer_behind_a_kept_vrt_is_added_back_and_not_the_vrt(bare_dock, tmp_path, source):
    from qgis_farslip.extent import gdal_dataset_name, vrt_arguments

    layer, kept = segmented_layer(tmp_path, source)
    assert in_the_cache(kept)
    tab = review_result_of(bare_dock, tmp_path, kept, layer.crs().authid())
    raster, refusal = tab.source_raster()
    assert refusal == "" and raster is not None
    assert gdal_dataset_name(raster) == gdal_dataset_name(layer) and not in_the_cache(raster.source())
    assert raster.crs() == layer.crs()
    assert vrt_arguments(raster, window_of(source))[2] == kept  # a run on it reads that VRT again (caches know it)
    assert raster_layers() == [raster]
    assert bare_dock.review_tab.source_raster() == (raster, "")  # found in the project the next time


def test_a_layer_of_the_kept_vrt_itself_is_not_taken(bare_dock, tmp_path):
    """A layer made of the VRT (as the Review tab added it before) breaks when the VRT is pruned: the layer
    behind it is added instead."""
    from qgis_farslip.extent import gdal_dataset_name

    layer, kept = segmented_layer(tmp_path, "a CRS set in QGIS")
    of_the_vrt = QgsRasterLayer(kept, "segmented VRT")
    QgsProject.instance().addMapLayer(of_the_vrt)
    raster, refusal = review_result_of(bare_dock, tmp_path, kept, SET_CRS).source_raster()
    assert refusal == "" and raster is not of_the_vrt
    assert gdal_dataset_name(raster) == gdal_dataset_name(layer) and raster.crs().authid() == SET_CRS


def test_a_pruned_vrt_finds_its_layer_in_the_project_and_is_named_without_it(bare_dock, tmp_path):
    layer, kept = segmented_layer(tmp_path, "a CRS set in QGIS")
    os.remove(kept)  # pruned: unused for 30 days
    QgsProject.instance().addMapLayer(layer)
    tab = review_result_of(bare_dock, tmp_path, kept, SET_CRS)
    assert tab.source_raster() == (layer, "")

    QgsProject.instance().removeMapLayer(layer.id())
    raster, refusal = tab.source_raster()
    assert raster is None and raster_layers() == []
    assert kept in refusal and "a VRT the plugin kept of a layer and has removed since" in refusal, refusal


def test_a_layer_that_cannot_be_added_back_as_it_was_is_named(bare_dock, tmp_path):
    """The VRT's dataset is gone (or QGIS cannot open it): nothing is added, the sentence says what to do."""
    _layer, kept = segmented_layer(tmp_path, "a CRS set in QGIS")
    os.remove(tmp_path / "segmented.tif")
    raster, refusal = review_result_of(bare_dock, tmp_path, kept, SET_CRS).source_raster()
    assert raster is None and raster_layers() == []
    assert kept in refusal and "no longer in the project" in refusal and "add that layer again" in refusal, refusal
