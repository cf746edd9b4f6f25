"""`farslip train` on label layers whose features are not plain polygons: geometry collections holding
polygons keep their polygons, and what is left out is counted in one warning line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio.raw
import shapely
from training_data import RASTER_CRS, make_synthetic
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


def train(raster: Path, labels: Path, model: Path, out: Path) -> tuple[int, list[str], list[str]]:
    """Exit code, stdout lines and stderr lines of a one-step `farslip train`."""
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    return result.exit_code, result.stdout.strip().splitlines(), result.stderr.strip().splitlines()


def polygons_of(labels: Path) -> tuple[list, list[str]]:
    _, _, wkb, fields = pyogrio.raw.read(labels)
    return list(shapely.from_wkb(wkb)), [str(v) for v in fields[0]]


def write_any(path: Path, geometries: list, values: list) -> Path:
    wkb = np.array([None if g is None else shapely.to_wkb(g) for g in geometries], dtype=object)
    pyogrio.raw.write(path, wkb, [np.array(values, dtype=object)], ["cls"], driver="GPKG",
                      geometry_type="Unknown", crs=RASTER_CRS)
    return path


def label_pixels(out: Path) -> dict[str, int]:
    return json.loads((out / "farslip_model.json").read_text())["label_pixels"]


def test_geometry_collections_holding_polygons_are_labels(tmp_path, tiny_model):
    raster, labels, _ = make_synthetic(tmp_path, labels_crs=RASTER_CRS)
    geometries, values = polygons_of(labels)
    code, _, err = train(raster, labels, tiny_model, tmp_path / "plain")
    assert code == 0, err
    # Every sand square as a collection of the square and a line; one collection of a point only.
    wrapped = [shapely.GeometryCollection([g, shapely.LineString(g.exterior.coords[:2])]) if v == "sand" else g
               for g, v in zip(geometries, values)]
    point = shapely.GeometryCollection([shapely.Point(*geometries[0].exterior.coords[0])])
    collections = write_any(tmp_path / "collections.gpkg", [*wrapped, point], [*values, "water"])
    code, _, err = train(raster, collections, tiny_model, tmp_path / "wrapped")
    assert code == 0, err
    assert label_pixels(tmp_path / "wrapped") == label_pixels(tmp_path / "plain")
    assert label_pixels(tmp_path / "wrapped")["sand"] > 0
    dropped = [line for line in err if "points or lines" in line]
    assert dropped == [f"Warning: 1 of the {len(values) + 1} features in collections.gpkg are points or lines, "
                       "not polygons, so they were left out (a label is an area)."], err


def test_features_without_geometry_area_or_place_on_the_raster_are_counted_in_one_warning(tmp_path, tiny_model):
    raster, labels, _ = make_synthetic(tmp_path, labels_crs=RASTER_CRS)
    geometries, values = polygons_of(labels)
    extra = [None, shapely.Polygon(), shapely.Polygon([(500010, 4999990), (500020, 4999980), (500010, 4999990)]),
             shapely.box(600000, 4000000, 600100, 4000100), shapely.box(400000, 4999000, 500000, 5000000)]
    dropped = write_any(tmp_path / "dropped.gpkg", [*geometries, *extra], [*values, *["water"] * len(extra)])
    code, _, err = train(raster, dropped, tiny_model, tmp_path / "dropped")
    assert code == 0, err
    code, _, plain = train(raster, labels, tiny_model, tmp_path / "plain")
    assert code == 0, plain
    assert label_pixels(tmp_path / "dropped") == label_pixels(tmp_path / "plain")
    features = len(values) + len(extra)
    said = [line for line in err if "left out" in line]
    assert said == [f"Warning: 5 of the {features} features in dropped.gpkg were left out: 2 without a geometry, "
                    "1 whose polygon has no area (a ring folded onto itself, repaired to nothing), 2 wholly "
                    "outside the raster."], err
    assert not [line for line in plain if "left out" in line]
    # evaluate says the same, and writes it in its report.
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", str(raster), str(dropped), "--class-field", "cls", "--model",
                                 str(tmp_path / "plain"), "--device", "cpu", "-q", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert said[0].removeprefix("Warning: ") in json.loads(report.read_text())["warnings"]
    assert said[0] in result.stderr.splitlines()


def test_a_class_whose_polygons_label_no_valid_pixel_is_refused_by_train_and_said_by_evaluate(tmp_path,
                                                                                              tiny_model):
    """A 'glacier' polygon wholly outside the raster (or on nodata) became a class of the model with 0 labelled
    pixels, its name competing for every pixel (validation mIoU fell from 99.9 to 26 %), told as pixels that
    only missed the training part; evaluate scored its IoU of 0 into the mIoU without a word."""
    raster, labels, _ = make_synthetic(tmp_path, labels_crs=RASTER_CRS)
    geometries, values = polygons_of(labels)
    xmin, _, _, ymax = shapely.total_bounds(geometries)
    away = shapely.box(xmin - 5000, ymax + 1000, xmin - 4000, ymax + 2000)  # beyond the raster's corner
    outside = write_any(tmp_path / "outside.gpkg", [*geometries, away], [*values, "glacier"])
    out = tmp_path / "model"
    code, _, err = train(raster, outside, tiny_model, out)
    assert code == 2, err
    assert err == ["Error: The polygons of the class 'glacier' in outside.gpkg label no valid pixel of the raster: "
                   "they lie outside it (or outside the --aoi), on nodata, under smaller polygons of other "
                   "classes, or are too thin to hold a pixel's centre: a model cannot learn it. Label it where the "
                   "raster has data, or remove those polygons from the labels."], err
    assert not out.exists() and not list(tmp_path.glob(".model*"))
    result = runner.invoke(app, ["evaluate", str(raster), str(outside), "--class-field", "cls", "--model",
                                 str(tiny_model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.stderr.splitlines() if "'glacier'" in line]
    assert len(said) == 1 and said[0].startswith("Warning: ") and "IoU of 0" in said[0], result.stderr


def test_a_shapefile_whose_cpg_names_the_wrong_encoding_is_said_so(tmp_path, tiny_model):
    """A latin-1 shapefile whose .cpg says UTF-8 (QGIS and ogrinfo open it) was 'damaged, or in a format GDAL does
    not read'."""
    raster, labels, _ = make_synthetic(tmp_path, labels_crs=RASTER_CRS)
    geometries, values = polygons_of(labels)
    shp = tmp_path / "águas.shp"
    pyogrio.raw.write(shp, shapely.to_wkb(np.array(geometries, dtype=object)),
                      [np.array([f"{v} á" for v in values], dtype=object)], ["cls"], driver="ESRI Shapefile",
                      geometry_type="Polygon", crs=RASTER_CRS, encoding="ISO-8859-1")
    shp.with_suffix(".cpg").write_text("UTF-8")
    code, _, err = train(raster, shp, tiny_model, tmp_path / "model")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"Error: The text of the labels file {shp} is not in the encoding its águas.cpg names "
                             "(utf-8): it holds the bytes b'\\xe1"), err
    assert "write the file's real encoding into águas.cpg" in err[0]
    shp.with_suffix(".cpg").write_text("ISO-8859-1")  # as the sentence says: then it trains, names intact
    code, _, err = train(raster, shp, tiny_model, tmp_path / "model")
    assert code == 0, err
    assert all(name.endswith(" á") for name in label_pixels(tmp_path / "model"))
