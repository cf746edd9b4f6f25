"""A raster layer whose file was deleted (or moved) after it was loaded is named in one sentence by every entry
point: the Segment, Search and Train tabs, the Review tab's "Train on my corrections", the Processing
algorithms and the VRT written for a layer that is not a plain file."""

from __future__ import annotations

import os
import re

import pytest
from plugin_helpers import added, review_loaded_result, subdataset, translated
from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback


def gone_text(path: str, name: str) -> str:
    return f"The file {path} of layer {name} no longer exists; remove the layer or point it to the moved file."


@pytest.fixture
def gone(bare_dock, tmp_path):
    """A layer of a GeoTIFF deleted after it was loaded, and that file's path."""
    path = translated(tmp_path, "gone.tif")
    layer = added(path, "gone")
    os.remove(path)
    return layer, path


def test_the_segment_search_and_train_tabs_name_the_deleted_file(bare_dock, gone):
    layer, path = gone
    bare_dock.form.classesEdit.setPlainText("water\ngrass")
    bare_dock.form.layerCombo.setLayer(layer)
    bare_dock.form.extentCombo.setCurrentIndex(bare_dock.form.extentCombo.findData("layer"))
    bare_dock.search_tab.form.searchRasterCombo.setLayer(layer)
    bare_dock.search_tab.form.sentencesEdit.setPlainText("a lake")
    bare_dock.form.trainRasterCombo.setLayer(layer)
    for build in (bare_dock.segment_parameters, bare_dock.search_tab.build_request,
                  bare_dock.train_tab.build_request):
        with pytest.raises(ValueError, match=f"^{re.escape(gone_text(path, 'gone'))}$"):
            build()


@pytest.mark.parametrize("algorithm_name", ["SegmentByClassNames", "SearchBySentences"])
def test_processing_names_the_deleted_file(gone, tmp_path, algorithm_name):
    from qgis_farslip import processing_provider

    layer, path = gone
    algorithm = getattr(processing_provider, algorithm_name)(lambda: None)
    algorithm.initAlgorithm()
    parameters = {"INPUT": layer, "CLASSES": "water", "SENTENCES": "a lake", "OUTPUT": str(tmp_path / "out.gpkg")}
    with pytest.raises(QgsProcessingException, match=f"^{re.escape(gone_text(path, 'gone'))}$"):
        algorithm.processAlgorithm(parameters, QgsProcessingContext(), QgsProcessingFeedback())


def test_the_vrt_of_a_layer_whose_geopackage_is_gone_names_the_file(bare_dock, tmp_path):
    from qgis_farslip.extent import LocalCopyError, vrt_arguments, write_vrt

    layer = added(subdataset(tmp_path), "table")
    os.remove(tmp_path / "tables.gpkg")
    with pytest.raises(LocalCopyError, match=re.escape(gone_text(str(tmp_path / "tables.gpkg"), "table"))):
        write_vrt(*vrt_arguments(layer))


def test_corrections_of_a_raster_whose_file_is_gone_name_it(bare_dock, gone, tmp_path):
    _layer, path = gone
    assert review_loaded_result(bare_dock, tmp_path, path) is None
    text = bare_dock.review_tab.form.reviewStatusLabel.text()
    assert text.startswith(gone_text(path, "gone")), text
