"""`farslip train --out ""` said "The raster r2.tif lies inside ., which training writes" (Path("") is the current
folder), `--out " "` wrote a model folder named " ", and `--out r2.tif` (the raster itself, an existing file) said
"The raster r2.tif lies inside r2.tif". Now an empty --out is said to be empty, and an existing file gets the
sentence any other existing file gets, before anything is read or written."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.service.cli import app
from training.api import check_request

runner = CliRunner()
EMPTY = "--out is empty: give the folder to write the fine-tuned model into (a new or empty folder)."


def train(raster, labels, model, out) -> tuple[int, list[str]]:
    result = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--weights", str(model),
                                 "--out", out, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                                 "--device", "cpu", "-q"])
    return result.exit_code, result.output.strip().splitlines()


@pytest.fixture
def here(synthetic, tmp_path, monkeypatch):
    """The raster and labels copied into the folder the command runs in, named as the user names them."""
    raster, labels, _ = synthetic
    shutil.copy(raster, tmp_path / "r2.tif")
    shutil.copy(labels, tmp_path / "lab2.gpkg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_said_to_be_empty(here, tiny_model, out):
    code, lines = train("r2.tif", "lab2.gpkg", tiny_model, out)
    assert (code, lines) == (2, [f"Error: {EMPTY}"])
    assert sorted(os.listdir(here)) == ["lab2.gpkg", "r2.tif"]


@pytest.mark.parametrize("out", ["r2.tif", "lab2.gpkg", "notes.txt"])
def test_an_existing_file_as_out_is_not_a_model_folder(here, tiny_model, out):
    (here / "notes.txt").write_text("mine")
    before = {name: (here / name).read_bytes() for name in os.listdir(here)}
    code, lines = train("r2.tif", "lab2.gpkg", tiny_model, out)
    assert (code, lines) == (2, [f"Error: {out} exists and is not a model folder; choose another --out (a fine-tuned "
                                 "model is written as a new folder)."])
    assert {name: (here / name).read_bytes() for name in os.listdir(here)} == before


def test_a_train_request_says_the_same(here, tiny_model):
    request = {"raster": str(here / "r2.tif"), "labels": str(here / "lab2.gpkg"), "class_field": "cls",
               "base_model": str(tiny_model)}
    with pytest.raises(InputError) as refused:
        check_request({**request, "out": ""})
    assert str(refused.value) == EMPTY.replace("--out", '"out"')
    with pytest.raises(InputError) as refused:
        check_request({**request, "out": str(here / "r2.tif")})
    assert str(refused.value).startswith(f"{here / 'r2.tif'} exists and is not a model folder")
