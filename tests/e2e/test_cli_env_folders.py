"""Folder variables (FARSLIP_WEIGHTS, FARSLIP_MODELS, ...) that name a file are said in one sentence."""

from __future__ import annotations

import subprocess

import pytest
from conftest import FARSLIP


@pytest.mark.parametrize("command", [["models"], ["segment", "RASTER", "-c", "water", "-c", "land", "--out", "r.gpkg"]])
def test_farslip_weights_naming_the_weights_file_is_said_not_looked_in(env, naip, tmp_path, command):
    """FARSLIP_WEIGHTS=/x/model.safetensors gave 'put FarSLIP2_ViT-B-16.pt at /x/model.safetensors/FarSLIP2...'
    (a path inside a file); `farslip models` now says the variable names a folder (a traceback at first)."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    command = [str(naip) if part == "RASTER" else part for part in command]
    run = subprocess.run([str(FARSLIP), *command], env={**env, "FARSLIP_WEIGHTS": str(weights)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"Error: FARSLIP_WEIGHTS names the file {weights}; it must name a folder: set it "
                                  f"to {tmp_path} (or leave it unset and pass the file itself with --weights).")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
