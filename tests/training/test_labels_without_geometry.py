"""Labels that are a table without geometry (a CSV of class names and x, y columns, a GeoPackage's attribute
table): `farslip train` and `evaluate` said the file had no coordinate reference system (set it in QGIS), and
POST /v1/train that it held only one class. Now each says in one sentence that the file holds no polygons, the
server (its request checks, before a job is queued) in the same words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.service.cli import app

TABLE = ("The labels file labels.csv is a table without geometry, so it holds no polygons; give a polygon layer "
         "(GeoPackage, Shapefile or GeoJSON).")


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("cls,x,y\nwater,1,2\n")
    return path


def _cli(command: str, raster: Path, labels: str, tiny_model: Path, tmp_path: Path, *extra: str):
    args = [command, str(raster), labels, "--class-field", "cls", "--device", "cpu", "-q", *extra]
    if command == "train":
        args += ["--weights", str(tiny_model), "--out", str(tmp_path / "model")]
    else:
        args += ["--model", str(tiny_model)]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_csv_without_geometry_is_said_to_hold_no_polygons(command, synthetic, tiny_model, table, tmp_path):
    raster, _, _ = synthetic
    result = _cli(command, raster, str(table), tiny_model, tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: {TABLE}"
    assert not (tmp_path / "model").exists()


def test_an_attribute_table_named_in_a_geopackage_is_said_to_hold_no_polygons(synthetic, tiny_model, tmp_path):
    raster, _, _ = synthetic
    both = tmp_path / "both.gpkg"
    pyogrio.raw.write(both, geometry=shapely.to_wkb(np.array([shapely.box(0, 0, 1, 1), shapely.box(1, 1, 2, 2)])),
                      field_data=[np.array(["water", "forest"], dtype=object)], fields=["cls"], layer="labels",
                      geometry_type="Polygon", crs="EPSG:32632", driver="GPKG")
    pyogrio.raw.write(both, geometry=None, field_data=[np.array(["water"], dtype=object)], fields=["cls"],
                      layer="table", driver="GPKG", append=True)
    result = _cli("evaluate", raster, f"{both}|layername=table", tiny_model, tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("Error: The layer 'table' of the labels file both.gpkg is a table without "
                                     "geometry, so it holds no polygons; give a polygon layer (GeoPackage, "
                                     "Shapefile or GeoJSON).")


def test_an_area_of_interest_without_geometry_is_said_to_hold_no_polygons(synthetic, tiny_model, table, tmp_path):
    raster, labels, _ = synthetic
    result = _cli("evaluate", raster, str(labels), tiny_model, tmp_path, "--aoi", str(table))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("Error: The area-of-interest file labels.csv is a table without geometry, so "
                                     "it holds no polygons; give a polygon layer (GeoPackage, Shapefile or GeoJSON).")


def test_the_servers_train_and_evaluate_checks_say_the_same(synthetic, tiny_model, table, tmp_path):
    """POST /v1/train and /v1/evaluate run these checks before queueing a job (the 400's detail is the sentence)."""
    from backend.service.evaluate_jobs import check_evaluate_request
    from backend.service.server.routes.train import TrainRequest, check_train_request

    raster, _, _ = synthetic
    with pytest.raises(InputError) as train:
        check_train_request(TrainRequest(raster=str(raster), labels=str(table), class_field="cls",
                                         out=str(tmp_path / "model"), base_model=str(tiny_model)))
    assert str(train.value) == TABLE
    with pytest.raises(InputError) as evaluate:
        check_evaluate_request({"raster": str(raster), "labels": str(table), "class_field": "cls",
                                "model": str(tiny_model)})
    assert str(evaluate.value) == TABLE
