"""An output whose folder is a file (or lies under one) is refused saying so, not as a folder that "does not
exist": the user sees the file to move, in every command that writes files."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.service.cli import app

SAMPLE = Path(__file__).resolve().parents[2] / "resources" / "sample" / "naip_2020_5m_crop.tif"


@pytest.mark.parametrize("command", [
    ["segment", str(SAMPLE), "-c", "water", "--out", "{out}"],
    ["search", str(SAMPLE), "a lake", "--out", "{out}"],
    ["classify", str(SAMPLE), "-c", "water", "-c", "forest", "--out", "{out}"],
])
@pytest.mark.parametrize("under", ["", "deeper"])
def test_an_output_folder_that_is_a_file_is_named_as_a_file(command, under, tiny_model, tmp_path):
    blocker = tmp_path / "notes"
    blocker.write_text("mine", encoding="utf-8")
    folder = blocker / under if under else blocker
    args = [part.replace("{out}", str(folder / "o.gpkg")) for part in command]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_model)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"The output folder {folder} is not a folder: {blocker} is a file." in message, message
    assert blocker.read_text(encoding="utf-8") == "mine" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_missing_output_folder_is_still_told_to_be_created(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["segment", str(SAMPLE), "-c", "water", "--model", str(tiny_model),
                                      "--out", str(tmp_path / "nowhere" / "o.gpkg")])
    assert result.exit_code == 2
    assert f"The output folder {tmp_path / 'nowhere'} does not exist; create it or choose another." in " ".join(
        result.output.split())


def test_a_training_out_under_a_file_is_named_as_a_file(tiny_model, tmp_path):
    blocker = tmp_path / "notes"
    blocker.write_text("mine", encoding="utf-8")
    labels = tmp_path / "labels.gpkg"  # never read: the output is checked first
    result = CliRunner().invoke(app, ["train", str(SAMPLE), str(labels), "--class-field", "cls", "--base-model",
                                      str(tiny_model), "--out", str(blocker / "model")])
    assert result.exit_code == 2, result.output
    assert f"The output folder {blocker} is not a folder: {blocker} is a file. Choose another --out" in " ".join(
        result.output.split())
