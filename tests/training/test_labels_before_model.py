"""A labels file without the --class-field is said before the model loads: a new user without weights was told
to download them first (exit 3), and only then that the labels were wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from backend.service.cli import app

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.parametrize("command", ["evaluate", "train"])
def test_a_missing_class_field_is_said_before_missing_weights(command, tmp_path, monkeypatch):
    monkeypatch.setenv("FARSLIP_WEIGHTS", str(tmp_path / "no-weights"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [command, str(DATA / "solaris_sample_geotiff.tif"), str(DATA / "solaris_geotiff_labels.geojson"),
            "--class-field", "cls", "--device", "cpu"]
    if command == "train":
        args += ["--out", str(tmp_path / "model")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "has no field 'cls'" in result.output and "not on this computer" not in result.output
    assert not (tmp_path / "model").exists()
