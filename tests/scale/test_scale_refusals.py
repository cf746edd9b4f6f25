"""What a run on Ray cannot do yet is refused in one sentence (exit 2) before Ray starts or a file is written."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from backend.service.cli import app


@pytest.mark.parametrize("flag, named", [("--cache-features", "--cache-features"),
                                         ("--no-region-checks", "--no-region-checks")])
def test_an_option_ray_does_not_offer_yet_is_refused_before_ray_starts(shared_data, tiny_model, tmp_path, flag,
                                                                       named):
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"),
                                      str(shared_data / "naip_2020_5m.tif"), "-c", "water", "--weights",
                                      str(tiny_model), "--out", str(out), "--workers", "2", flag])
    assert result.exit_code == 2, result.output
    assert named in result.output and "not available on Ray" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
