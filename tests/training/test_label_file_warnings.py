"""What `farslip train` and `farslip evaluate` say of labels that are empty or unreadable (one sentence, no
library text), of a model's recorded background, and of labelled pixels the scores leave out or two classes
claim (one warning line each, in the report's "warnings" too)."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import shapely
from training_data import RASTER_CRS, make_synthetic, write_labels
from typer.testing import CliRunner

from backend.engine.raster import open_source
from backend.service.cli import app
from training.api import split_warnings
from training.labels import build_label_grid, read_label_polygons
from training.sampling import PixelBox, SpatialSplit

runner = CliRunner()
TRAIN = ("--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2")


def farslip(*args) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        result = runner.invoke(app, [*map(str, args), "--device", "cpu", "-q"])
    library = [str(w.message) for w in heard if "pyogrio" in w.filename or "GPKG" in str(w.message)]
    assert not library, library  # no library line reaches the user
    return result.exit_code, result.output.strip().splitlines()


def train(raster, labels, model, out, *extra) -> tuple[int, list[str]]:
    return farslip("train", raster, labels, "--class-field", "cls", "--out", out, "--base-model", model, *TRAIN,
                   *extra)


def evaluate(raster, labels, model, *extra) -> tuple[int, list[str]]:
    return farslip("evaluate", raster, labels, "--class-field", "cls", "--model", model, *extra)


def said(lines: list[str]) -> list[str]:
    """The warnings of a run's output, but for the one of a run too short to beat the base model and the one of
    region-category alignment, which the synthetic blocks are too small for (their own tests)."""
    return without_base_model_note([line[len("Warning: "):] for line in lines if line.startswith("Warning: ")])


def without_base_model_note(warnings: list[str]) -> list[str]:
    return [warning for warning in warnings if "scored above the base model" not in warning
            and not warning.startswith("Region-category alignment did not run")]


@pytest.fixture
def scene(tmp_path):
    (tmp_path / "scene").mkdir()
    raster, labels, classes = make_synthetic(tmp_path / "scene", labels_crs=RASTER_CRS)
    return raster, labels, classes


def _labels_of(labels):
    _, _, wkb, fields = pyogrio.raw.read(labels, columns=["cls"])
    return list(shapely.from_wkb(wkb)), list(fields[0])


# --- empty and unreadable label files ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_empty_geojson_is_said_to_hold_no_features(synthetic, tiny_model, tmp_path, command):
    raster, _, _ = synthetic
    empty = tmp_path / "empty2.geojson"
    empty.write_text('{"type":"FeatureCollection","features":[]}', encoding="utf-8")
    if command == "train":
        code, lines = train(raster, empty, tiny_model, tmp_path / "model")
    else:
        code, lines = evaluate(raster, empty, tiny_model, "--split", "all")
    assert code == 2 and lines == ["Error: The labels file empty2.geojson holds no features."], lines


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("name, words", [
    ("damaged.gpkg", "is not a readable GeoPackage (damaged or not a GeoPackage)"),
    ("damaged.geojson", "cannot be read as a vector layer (it is damaged, or in a format GDAL does not read)"),
])
def test_a_damaged_labels_file_is_one_sentence_without_library_text(synthetic, tiny_model, tmp_path, command,
                                                                    name, words):
    raster, _, _ = synthetic
    damaged = tmp_path / name
    damaged.write_bytes((b"SQLite format 3\x00" if name.endswith(".gpkg") else b"{\"type\": ") + os.urandom(4000))
    if command == "train":
        code, lines = train(raster, damaged, tiny_model, tmp_path / "model")
    else:
        code, lines = evaluate(raster, damaged, tiny_model, "--split", "all")
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not re.search(r"sqlite|SELECT|application_id|not recognized|DRIVER", lines[0]), lines
    assert not (tmp_path / "model").exists()


# --- the background a model was trained with ---------------------------------------------------------


def test_evaluate_split_all_reuses_the_models_background_on_its_own_labels(scene, tiny_model, tmp_path):
    raster, labels, _ = scene
    geometries, values = _labels_of(labels)
    yes = [g for g, v in zip(geometries, values) if v == "water"]
    one_class = write_labels(tmp_path / "buildings.geojson", yes, ["yes"] * len(yes), RASTER_CRS)
    model = tmp_path / "model"
    code, lines = train(raster, one_class, tiny_model, model, "--background", "ground", "--class-name",
                        "yes=building")
    assert code == 0, lines
    for split in ("auto", "all"):
        report = tmp_path / f"{split}.json"
        code, lines = evaluate(raster, one_class, model, "--split", split, "--json", report)
        assert code == 0, lines
        result = json.loads(report.read_text())
        assert result["class_lines"] == ["building", "ground"] and result["background"] == "ground", result


# --- a validation strip without some of the classes ----------------------------------------------------


def test_a_validation_strip_without_a_class_is_a_warning_in_train_and_evaluate(scene, tiny_model, tmp_path):
    raster, labels, _ = scene
    # "reed" only in two blocks in the middle of the labelled area: the strip along any edge lacks it.
    geometries, values = _labels_of(labels)
    values = ["reed" if i in (3 * 8 + 3, 4 * 8 + 4) else value for i, value in enumerate(values)]
    labels = write_labels(tmp_path / "reed.gpkg", geometries, values, RASTER_CRS)
    report = tmp_path / "train.json"
    code, lines = train(raster, labels, tiny_model, tmp_path / "model", "--json", report)
    assert code == 0, lines
    edge = json.loads(report.read_text())["split"]["edge"]
    expected = (f"The validation strip along the {edge} edge holds no labelled pixels of the class 'reed', so its "
                "mIoU does not score how well the model finds it; label some of it near that edge too.")
    assert said(lines) == [expected], lines
    assert without_base_model_note(json.loads(report.read_text())["warnings"]) == [expected]
    evaluated = tmp_path / "evaluate.json"
    code, lines = evaluate(raster, labels, tmp_path / "model", "--json", evaluated)
    assert code == 0, lines
    assert json.loads(evaluated.read_text())["split"] == "validation"
    assert said(lines) == [expected] and json.loads(evaluated.read_text())["warnings"] == [expected]


def test_split_warnings_name_the_classes_the_validation_strip_lacks():
    box = PixelBox(0, 0, 10, 10)
    split = SpatialSplit("top", box, box, 32, (0, 0, 1, 1), (0, 0, 1, 1),
                         {"water": 500, "forest": 300, "sand": 40, "reed": 0}, {"water": 90, "forest": 0, "sand": 0,
                                                                                "reed": 0})
    assert split_warnings(split)[-1] == ("The validation strip along the top edge holds no labelled pixels of the "
                                         "classes 'forest', 'sand', so its mIoU does not score how well the model "
                                         "finds them; label some of them near that edge too.")


# --- labelled pixels on nodata, and pixels two classes claim ---------------------------------------


def _nodata_rows(raster, rows: int) -> None:
    """The raster's first `rows` rows become nodata (0)."""
    with rasterio.open(raster, "r+") as ds:
        ds.nodata = 0
        pixels = ds.read()
        pixels[:, :rows] = 0
        pixels[:, rows:][pixels[:, rows:] == 0] = 1
        ds.write(pixels)


def test_labelled_pixels_on_nodata_are_counted_in_a_warning(scene, tiny_model, tmp_path):
    raster, labels, _ = scene
    _nodata_rows(raster, 96)
    # Blocks of 48 px inset by 3 px: 8 blocks of 42 x 42 labelled pixels in each band of 48 rows.
    on_nodata, labelled = 2 * 8 * 42 * 42, 8 * 8 * 42 * 42
    expected = (f"{on_nodata} of the {labelled} labelled pixels of labels.gpkg lie on the raster's nodata, so they "
                "were left out.")
    report = tmp_path / "evaluate.json"
    code, lines = evaluate(raster, labels, tiny_model, "--split", "all", "--json", report)
    assert code == 0, lines
    assert said(lines) == [expected] and json.loads(report.read_text())["warnings"] == [expected], lines
    assert json.loads(report.read_text())["metrics"]["pixels"] == labelled - on_nodata
    trained = tmp_path / "train.json"
    code, lines = train(raster, labels, tiny_model, tmp_path / "model", "--json", trained)
    assert code == 0, lines
    assert expected in said(lines) and expected in json.loads(trained.read_text())["warnings"], lines


def test_pixels_claimed_by_two_classes_are_counted_in_a_warning(scene, tiny_model, tmp_path):
    raster, labels, _ = scene
    geometries, values = _labels_of(labels)
    other = {"water": "sand", "sand": "forest", "forest": "water"}
    # The first block again with another class, and half of the second block under a third polygon.
    half = shapely.box(*geometries[1].bounds[:2], geometries[1].bounds[2], geometries[1].centroid.y)
    pyogrio.raw.write(labels, np.array(shapely.to_wkb([geometries[0], half]), dtype=object),
                      [np.array([other[values[0]], other[values[1]]], dtype=object)], ["cls"], driver="GPKG",
                      geometry_type="Polygon", crs=RASTER_CRS, append=True)
    contested = 42 * 42 + 42 * 21
    expected = (f"{contested} labelled pixels of labels.gpkg lie under polygons of more than one class; each took "
                "the class of the smallest polygon over it (of polygons the same size, the later feature's).")
    with open_source(raster) as source:
        grid = build_label_grid(source, read_label_polygons(labels, "cls", source.crs))
    assert grid.polygons.contested == contested
    report = tmp_path / "evaluate.json"
    code, lines = evaluate(raster, labels, tiny_model, "--split", "all", "--json", report)
    assert code == 0, lines
    assert said(lines) == [expected] and json.loads(report.read_text())["warnings"] == [expected], lines
    code, lines = train(raster, labels, tiny_model, tmp_path / "model")
    assert code == 0, lines
    assert expected in said(lines), lines


def test_touching_polygons_of_two_classes_claim_no_pixel_twice(scene):
    raster, labels, _ = scene
    geometries, _ = _labels_of(labels)
    # A polygon of another class right beside the first block, sharing its edge only.
    _, y0, x1, y1 = geometries[0].bounds
    pyogrio.raw.write(labels, np.array([shapely.to_wkb(shapely.box(x1, y0, x1 + 4, y1))], dtype=object),
                      [np.array(["reed"], dtype=object)], ["cls"], driver="GPKG", geometry_type="Polygon",
                      crs=RASTER_CRS, append=True)
    with open_source(raster) as source:
        grid = build_label_grid(source, read_label_polygons(labels, "cls", source.crs))
    assert grid.polygons.contested == 0 and not grid.polygons.warnings
