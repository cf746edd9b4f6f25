"""Reports Python writes (evaluate's --json and --png) under a name typed in a Latin-1 terminal ('ré' as the
bytes r 0xe9): the UTF-8 check meant for the files GDAL opens and writes refused them ("GDAL takes no other"),
though Python writes them by any name. They are written; a polygon output by that name is still refused."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from backend.service.cli import app

LATIN1 = os.fsdecode(b"r\xe9")  # the name Python reads from the bytes of a Latin-1 'ré'


def test_evaluate_writes_its_reports_under_a_latin1_name(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    report, png = tmp_path / f"{LATIN1}.json", tmp_path / f"{LATIN1}.png"
    result = CliRunner().invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                      str(tiny_model), "--device", "cpu", "-q", "--json", str(report),
                                      "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"r\xe9.json", b"r\xe9.png"]
    assert "miou" in json.loads(report.read_text())["metrics"]


def test_a_polygon_output_under_a_latin1_name_is_still_one_sentence(synthetic, tiny_model, tmp_path):
    raster, _labels, _ = synthetic
    out = tmp_path / f"{LATIN1}.gpkg"
    result = CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "forest", "--model",
                                      str(tiny_model), "--device", "cpu", "-q", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "is not valid UTF-8 text" in result.output and not os.listdir(tmp_path)
