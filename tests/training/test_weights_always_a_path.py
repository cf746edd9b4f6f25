"""--weights names a file (or a fine-tuned model folder) by its path, however bare the name: `--weights nosuch.pt`
that is not there said "Unknown model 'nosuch.pt'. Known models: ...", and a --weights value spelling a registry
model's name or a model in the models folder loaded that model instead of a file. Now a --weights that is not
there says the weights file does not exist, with the path as resolved from the folder the command runs in."""

from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

from backend.engine import paths
from backend.service.cli import app

runner = CliRunner()


def farslip(*args) -> tuple[int, list[str]]:
    result = runner.invoke(app, [*map(str, args), "--device", "cpu", "-q"])
    return result.exit_code, result.output.strip().splitlines()


@pytest.mark.parametrize("given", ["nosuch.pt", "./nosuch.pt", "sub/../nosuch.pt", "farslip2-vit-b-16"])
@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_a_weights_file_that_is_not_there_is_named_by_its_path(synthetic, tmp_path, monkeypatch, given, command):
    raster, labels, _ = synthetic
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    extra = ["--out", "m"] if command == "train" else []
    code, lines = farslip(command, raster, labels, "--class-field", "cls", "--weights", given, *extra)
    resolved = os.path.normpath(work / given)
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: The weights file {resolved} ") and lines[0].endswith(" does not exist."), lines
    assert "Unknown model" not in lines[0] and "Known models" not in lines[0]
    assert sorted(os.listdir(work)) == ["sub"]


def test_an_absolute_weights_path_and_one_beside_a_registry_name(synthetic, tmp_path):
    raster, labels, _ = synthetic
    missing = tmp_path / "nosuch.pt"
    code, lines = farslip("evaluate", raster, labels, "--class-field", "cls", "--weights", missing)
    assert (code, lines) == (3, [f"Error: The weights file {missing} does not exist."])
    code, lines = farslip("segment", raster, "-c", "water", "-c", "sand", "--model", "clip-vit-b-16", "--weights",
                          missing, "--out", tmp_path / "s.gpkg")
    assert (code, lines) == (3, [f"Error: The weights file {missing} does not exist."])


def test_a_bare_weights_name_is_not_a_model_of_the_models_folder(synthetic, tiny_model, tmp_path, monkeypatch):
    """A fine-tuned model kept in the models folder is taken by --model NAME, not by --weights NAME."""
    raster, labels, _ = synthetic
    kept = paths.models_dir() / "kept"
    kept.mkdir(parents=True)
    shutil.copy(tiny_model, kept / "model.safetensors")
    (kept / "farslip_model.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    code, lines = farslip("evaluate", raster, labels, "--class-field", "cls", "--weights", "kept")
    assert (code, lines) == (3, [f"Error: The weights file {tmp_path / 'kept'} (--weights kept) does not exist."])
