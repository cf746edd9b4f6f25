"""`farslip evaluate` of a model trained with --class-name renames, on the labels it was trained on: the
same class set whatever --split says."""

from __future__ import annotations

import json

from training_data import RASTER_CRS, make_synthetic
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


def test_evaluate_split_all_applies_the_models_renames_on_its_own_labels(tmp_path, tiny_model):
    raster, labels, _ = make_synthetic(tmp_path, labels_crs=RASTER_CRS)
    model = tmp_path / "model"
    trained = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(model),
                                  "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                  "--batch-size", "2", "--device", "cpu", "-q", "--class-name", "sand=beach"])
    assert trained.exit_code == 0, trained.output
    assert json.loads((model / "farslip_model.json").read_text())["class_lines"] == ["beach", "forest", "water"]
    reports = {}
    for split in ("auto", "all"):
        report = tmp_path / f"{split}.json"
        result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                     str(model), "--device", "cpu", "-q", "--split", split, "--json", str(report)])
        assert result.exit_code == 0, result.output
        reports[split] = json.loads(report.read_text())
    assert reports["auto"]["split"] == "validation" and reports["all"]["split"] == "all"
    for report in reports.values():
        assert report["class_lines"] == ["beach", "forest", "water"], report["class_lines"]
        assert report["processing"]["class_names"] == {"sand": "beach"}
        assert report["metrics"]["class_names"] == ["beach", "forest", "water"]
