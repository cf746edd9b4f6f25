"""`farslip train` and `farslip evaluate` on a raster named in GDAL's syntax: a GeoPackage raster table
(GPKG:/abs/a.gpkg:t1) and a zipped GeoTIFF (/vsizip//abs/a.zip/x.tif), kept as typed.

Before, training.api read the name as a file: a pathlib.Path folded /vsizip//abs's '//' (GDAL found no archive),
a subdataset had no sha256 (so --resume took a rewritten container for the same raster), the model recorded
<working folder>/GPKG:..., and evaluating the fine-tuned model on the same name ended in a FileNotFoundError
traceback (the file sha256 of 'GPKG:...').
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from training_data import copy_as_gpkg_table, make_synthetic
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(raster: str, labels: Path, model: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", raster, str(labels), "--class-field", "cls", "--out", str(out),
                                 "--base-model", str(model), "--epochs", "1", "--steps-per-epoch", "2",
                                 "--batch-size", "2", "--device", "cpu", "-q", *extra])
    return result.exit_code, result.output.strip()


def evaluate(raster: str, labels: Path, model: Path, *extra: str):
    return runner.invoke(app, ["evaluate", raster, str(labels), "--class-field", "cls", "--model", str(model),
                               "--device", "cpu", "-q", *extra])


@pytest.fixture(scope="module")
def containers(synthetic, tmp_path_factory) -> dict:
    """The synthetic raster as a GeoPackage table and zipped."""
    raster, labels, _ = synthetic
    folder = tmp_path_factory.mktemp("gdal-names-train")
    copy_as_gpkg_table(raster, folder / "a.gpkg")
    with zipfile.ZipFile(folder / "a.zip", "w") as archive:
        archive.write(raster, "sub/synthetic.tif")
    return {"folder": folder, "labels": labels, "gpkg": folder / "a.gpkg", "zip": folder / "a.zip",
            "names": {"gpkg": f"GPKG:{folder / 'a.gpkg'}:t1", "zip": f"/vsizip/{folder / 'a.zip'}/sub/synthetic.tif"},
            "where": {"gpkg": "GPKG:{}:t1", "zip": "/vsizip/{}/sub/synthetic.tif"}}


@pytest.fixture(scope="module")
def trained(containers, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """One fine-tuned model per GDAL name (one epoch of two steps)."""
    folder = tmp_path_factory.mktemp("gdal-names-models")
    models = {}
    for kind, name in containers["names"].items():
        out = folder / kind
        code, output = train(name, containers["labels"], tiny_model, out)
        assert code == 0, output
        models[kind] = out
    return models


@pytest.mark.parametrize("kind", ["gpkg", "zip"])
def test_train_on_a_gdal_name_records_it_as_typed_with_its_container(containers, trained, kind):
    name = containers["names"][kind]
    assert name.startswith(("GPKG:/", "/vsizip//"))
    meta = json.loads((trained[kind] / "farslip_model.json").read_text())
    # Its absolute GDAL name (not <cwd>/GPKG:...), the container's sha256 and the raster's name inside it.
    assert meta["data"]["raster"] == {"path": name, "sha256": sha256(containers[kind]),
                                      "name": containers["where"][kind]}
    assert name in meta["description"]


def test_a_plain_file_keeps_the_record_it_always_had(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    code, output = train(str(raster), labels, tiny_model, tmp_path / "m")
    assert code == 0, output
    meta = json.loads((tmp_path / "m" / "farslip_model.json").read_text())
    assert meta["data"]["raster"] == {"path": str(raster.resolve()), "sha256": sha256(raster)}


@pytest.mark.parametrize("kind", ["gpkg", "zip"])
def test_evaluate_the_finetuned_model_on_the_same_gdal_name_uses_its_validation_strip(
        containers, trained, kind, tmp_path, monkeypatch):
    report = tmp_path / "metrics.json"
    result = evaluate(containers["names"][kind], containers["labels"], trained[kind], "--json", str(report))
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(report.read_text())["split"] == "validation"
    # Another spelling of the same raster (relative to the working folder) is the same data.
    monkeypatch.chdir(containers["folder"])
    relative = {"gpkg": "GPKG:a.gpkg:t1", "zip": "/vsizip/a.zip/sub/synthetic.tif"}[kind]
    result = evaluate(relative, containers["labels"], trained[kind], "--split", "validation", "--json",
                      str(report), "--overwrite")
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(report.read_text())["split"] == "validation"


def test_evaluate_on_another_table_is_not_the_training_data(containers, trained, tmp_path):
    gpkg = tmp_path / "b.gpkg"
    shutil.copy(containers["gpkg"], gpkg)  # the same bytes, but the zip's model was trained on a zip's member
    result = evaluate(f"GPKG:{gpkg}:t1", containers["labels"], trained["zip"], "--split", "validation")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "--split validation needs a fine-tuned model trained on this raster" in result.output


def test_resume_refuses_a_rewritten_container(containers, trained, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained["gpkg"], model)
    gpkg = tmp_path / "a.gpkg"
    shutil.copy(containers["gpkg"], gpkg)
    name = f"GPKG:{gpkg}:t1"
    # The same container's bytes: the data check passes, and the finished model wants more epochs.
    code, output = train(name, containers["labels"], tiny_model, model, "--resume")
    assert code == 2 and "already ran 1 epochs" in output, output
    # The container rewritten with other pixels: another raster, which --resume refuses.
    other, _, _ = make_synthetic(tmp_path, seed=1)
    copy_as_gpkg_table(other, gpkg)
    code, output = train(name, containers["labels"], tiny_model, model, "--resume", "--epochs", "2")
    assert code == 2 and "used other data files" in output, output
