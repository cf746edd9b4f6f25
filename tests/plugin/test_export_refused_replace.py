"""Exporting again onto a shapefile the system will not let go: Windows refuses to replace a file a program holds
open, as QGIS holds a loaded layer's (simulated: os.replace raises PermissionError for that file). The export
says so in words, and the earlier shapefile stays whole, with every part it had."""

from __future__ import annotations

import os

import pytest
from osgeo import ogr
from plugin_helpers import run_result_layer
from qgis.core import QgsVectorLayer


def memory_result(run_id: str, cls: str) -> QgsVectorLayer:
    return run_result_layer("result", run_id, cls)


def files_of(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def classes_in(path: str) -> list[str]:
    dataset = ogr.Open(path)  # kept while its layer is read
    return [feature.GetField("class") for feature in dataset.GetLayer(0)]


@pytest.mark.parametrize("refused", [".shp", ".dbf"])
def test_a_shapefile_that_cannot_be_replaced_is_kept_whole_and_the_export_says_why(bare_dock, tmp_path, monkeypatch,
                                                                                   refused):
    path = str(tmp_path / "result.shp")
    assert bare_dock.export_result(path, memory_result("run-A", "building")) == path  # and loaded as 'result'
    (tmp_path / "result.qix").write_bytes(b"its spatial index")
    before = files_of(tmp_path)
    real_replace = os.replace

    def windows_replace(source, target):
        if str(tmp_path / f"result{refused}") in (os.fspath(source), os.fspath(target)):
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", os.fspath(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", windows_replace)
    assert bare_dock.export_result(path, memory_result("run-B", "water")) is None
    assert bare_dock.form.statusLabel.text() == (
        f"{path} cannot be replaced (The process cannot access the file because it is being used by another "
        "process), so it is left as it was; it is open in QGIS as the layer result: remove that layer from the "
        "project, or export to another file name.")
    assert files_of(tmp_path) == before, "parts of the earlier shapefile were removed or changed"
    assert classes_in(path) == ["building"]

    monkeypatch.undo()  # the layer let go of: the export replaces it, and its stale spatial index goes
    assert bare_dock.export_result(path, memory_result("run-B", "water")) == path
    assert classes_in(path) == ["water"]
    assert sorted(os.listdir(tmp_path)) == ["result.cpg", "result.dbf", "result.prj", "result.qml", "result.shp",
                                            "result.shx"]
