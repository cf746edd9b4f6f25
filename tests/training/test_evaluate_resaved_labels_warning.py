"""`farslip evaluate --split auto` of a fine-tuned model on the raster it was trained on, with labels it cannot
match to its own (here the same features re-saved: another file, another sha256), scored all labelled pixels, those
the model was trained on included, without a word. It now warns, as it does when --scale/--gsd keeps the held-out
strip from applying."""

from __future__ import annotations

import json
import shutil

import pyogrio.raw
import pytest
from typer.testing import CliRunner

from backend.engine.weights import file_sha256
from backend.service.cli import app

runner = CliRunner()
WARNING = ("Warning: The model was trained on this raster, but these labels cannot be matched to the ones it was "
           "trained on")
OWN_LABELS = "Warning: These are the labels the model was trained on, but this raster cannot be matched"


@pytest.fixture(scope="module")
def trained(synthetic, tiny_model, tmp_path_factory):
    raster, labels, _ = synthetic
    model = tmp_path_factory.mktemp("trained") / "model"
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(model),
                                 "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                 "--batch-size", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return model


def resaved(labels, folder):
    """The same features written again to another GeoPackage: another file, same polygons and classes."""
    meta, _, geometry, fields = pyogrio.raw.read(labels)
    copy = folder / "resaved.gpkg"
    pyogrio.raw.write(copy, geometry, fields, meta["fields"], geometry_type="Polygon", crs=meta["crs"], driver="GPKG")
    assert file_sha256(copy) != file_sha256(labels)
    return copy


def evaluate(raster, labels, model, report, *extra):
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model", str(model),
                                 "--device", "cpu", "-q", "--json", str(report), *extra])
    assert result.exit_code == 0, result.output
    return result.output.splitlines(), json.loads(report.read_text())


def test_resaved_labels_on_the_training_raster_are_scored_with_a_warning(synthetic, trained, tmp_path):
    raster, labels, _ = synthetic
    lines, report = evaluate(raster, resaved(labels, tmp_path), trained, tmp_path / "auto.json")
    assert report["split"] == "all"
    said = [line for line in lines if line.startswith(WARNING)]
    assert len(said) == 1, lines
    assert "scored on all labelled pixels, which may include those it was trained on" in said[0]
    assert f"(give its own labels, {labels}, to score the held-out strip)." in said[0]
    assert any(warning.startswith(WARNING[len("Warning: "):]) for warning in report["warnings"])


def test_no_warning_for_its_own_labels_for_split_all_or_for_another_raster(synthetic, trained, tmp_path):
    raster, labels, _ = synthetic
    lines, report = evaluate(raster, labels, trained, tmp_path / "own.json")
    assert report["split"] == "validation" and not any(line.startswith(WARNING) for line in lines)
    copy = resaved(labels, tmp_path)
    lines, report = evaluate(raster, copy, trained, tmp_path / "all.json", "--split", "all")
    assert report["split"] == "all" and not any(line.startswith(WARNING) for line in lines)
    # Another raster (the same pixels with a byte appended: another file) is not the one it was trained on.
    other = tmp_path / "other.tif"
    shutil.copy(raster, other)
    with open(other, "ab") as extra:
        extra.write(b"\0")
    lines, report = evaluate(other, copy, trained, tmp_path / "other.json")
    assert report["split"] == "all" and not any(line.startswith(("Warning: The model", OWN_LABELS)) for line in lines)


def test_its_own_labels_on_a_copy_of_its_raster_are_scored_with_a_warning(synthetic, trained, tmp_path):
    """The other way round: the labels it was trained on, the raster re-saved (another file)."""
    raster, labels, _ = synthetic
    other = tmp_path / "copy.tif"
    shutil.copy(raster, other)
    with open(other, "ab") as extra:
        extra.write(b"\0")
    lines, report = evaluate(other, labels, trained, tmp_path / "copy.json")
    assert report["split"] == "all"
    said = [line for line in lines if line.startswith(OWN_LABELS)]
    assert len(said) == 1 and not any(line.startswith(WARNING) for line in lines), lines
    assert "scored on all labelled pixels, the polygons it was trained on included" in said[0]
    assert said[0].endswith(f"(give its own raster, {raster}, to score the held-out strip).")
    lines, report = evaluate(other, labels, trained, tmp_path / "all.json", "--split", "all")
    assert not any(line.startswith(OWN_LABELS) for line in lines)
