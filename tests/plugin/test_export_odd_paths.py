"""Exporting results into a GeoPackage whose folder or name has '#', '?', '%', spaces or letters of other scripts
(SQLite reads such a path only percent-quoted in its URI)."""

from __future__ import annotations

import os
import sqlite3

import pytest
from osgeo import ogr
from plugin_helpers import run_result_layer
from qgis.core import QgsVectorLayer


def memory_result(name: str, run_id: str, cls: str) -> QgsVectorLayer:
    return run_result_layer(name, run_id, cls)


def classes_by_table(path: str) -> dict[str, list[str]]:
    dataset = ogr.Open(path)
    return {layer.GetName(): sorted(feature.GetField("class") for feature in layer)
            for layer in dataset if layer.GetName() != "layer_styles"}


def styled_tables(path: str) -> list[str]:
    with sqlite3.connect(path) as database:
        return sorted(row[0] for row in database.execute("SELECT f_table_name FROM layer_styles"))


@pytest.mark.parametrize("folder", ["Job #3 ?%", "Relevé été #2", "100% done?x=1#y"])
def test_two_results_exported_into_one_geopackage_under_an_odd_folder_both_stay(bare_dock, tmp_path, folder):
    path = str(tmp_path / folder / "out #1?.gpkg")
    first = memory_result("result", "run-A", "building")
    second = memory_result("result", "run-B", "water")

    assert bare_dock.export_result(path, first) == path, bare_dock.form.statusLabel.text()
    assert bare_dock.export_result(path, second) == path, bare_dock.form.statusLabel.text()
    assert "The GeoPackage already had a layer result" in bare_dock.form.statusLabel.text()
    assert classes_by_table(path) == {"result": ["building"], "result_2": ["water"]}, \
        "the second result replaced the first one's table"
    # Exporting the first again replaces its own table (and its style), nothing else.
    assert bare_dock.export_result(path, first) == path, bare_dock.form.statusLabel.text()
    assert classes_by_table(path) == {"result": ["building"], "result_2": ["water"]}
    assert styled_tables(path) == ["result", "result_2"]
    assert all(name.startswith("out #1?.gpkg") for name in os.listdir(tmp_path / folder))  # and its -wal, -shm


def test_a_geopackage_whose_layers_cannot_be_listed_now_is_not_written_to(bare_dock, tmp_path, monkeypatch):
    from qgis_farslip import exporting

    path = str(tmp_path / "results.gpkg")
    assert bare_dock.export_result(path, memory_result("result", "run-A", "building")) == path
    real_connect = sqlite3.connect

    def locked(database, *args, **kwargs):  # another program is writing to it, say
        if "results.gpkg" in str(database):
            raise sqlite3.OperationalError("database is locked")
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr(exporting.sqlite3, "connect", locked)
    assert bare_dock.export_result(path, memory_result("result", "run-B", "water")) is None
    assert bare_dock.form.statusLabel.text() == (f"The layers of {path} cannot be read (database is locked); it is "
                                                 "left as it is: export to another file.")
    monkeypatch.undo()
    assert classes_by_table(path) == {"result": ["building"]}
