"""A fine-tuned model folder's own quality calibration that is damaged, or was copied in from another model, was
read only after the whole raster was segmented, and the run ended in its refusal: hours of a large raster lost
for a file that only weighs the confidence figure. It is set aside with a warning; the built-in estimate is used."""

from __future__ import annotations

import json

import pytest

from backend.engine.quality import QualityModel, calibration_path_for


@pytest.fixture
def model_folder(tmp_path, tiny_model):
    folder = tmp_path / "fine"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(tiny_model.read_bytes())
    (folder / "farslip_model.json").write_text(json.dumps({"format": "farslip-finetuned/1", "name": "fine"}))
    return folder


@pytest.mark.parametrize("damage", ["cut short", "another model's"])
def test_a_damaged_or_foreign_own_calibration_is_set_aside_and_the_run_completes(farslip_cli, naip, small_bbox,
                                                                               model_folder, tmp_path, damage):
    calibration = calibration_path_for(model_folder)
    if damage == "cut short":
        calibration.write_text('{"format": "farslip-quality-cal', "utf-8")
    else:
        QualityModel(weights_sha256="0" * 64, source="fitted").save(calibration)
    out = tmp_path / "result.gpkg"
    run = farslip_cli("segment", str(naip), "-c", "water", "-c", "land", "--weights", str(model_folder),
                      "--bbox", *map(str, small_bbox), "-o", str(out), "-q")
    assert run.returncode == 0, run.stderr
    assert f"Warning: The quality calibration {calibration} " in run.stderr, run.stderr
    assert ("The quality comes from the built-in estimate; calibrate again with farslip evaluate "
            "--calibrate-quality.") in run.stderr
    report = json.loads(out.with_suffix(".report.json").read_text("utf-8"))
    assert report["quality"]["calibration"] == "default"
    assert out.is_file()
