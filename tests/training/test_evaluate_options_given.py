"""`farslip evaluate` refuses the options that only work with --calibrate-quality or --benchmark when given
without it, whatever their value: the default typed out (`--quality-tile 64`, `--protocol farslip`) was taken
for "not given" and silently ignored, so the user believed it had its effect."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


@pytest.mark.parametrize(("extra", "sentence"), [
    (["--quality-tile", "64"], "--quality-tile applies only with --calibrate-quality; add --calibrate-quality, "
                               "or leave --quality-tile out."),
    (["--quality-tile", "32"], "--quality-tile applies only with --calibrate-quality"),
    (["--force-calibration", "--quality-tile", "64"],
     "--quality-tile and --force-calibration apply only with --calibrate-quality"),
    (["--protocol", "farslip"], "--protocol applies only with --benchmark FOLDER; add --benchmark FOLDER, or "
                                "leave --protocol out."),
    (["--long-side", "448"], "--long-side applies only with --benchmark FOLDER"),
    (["--ignore-index", "255"], "--ignore-index applies only with --benchmark FOLDER"),
    (["--no-reduce-zero-label"], "--reduce-zero-label applies only with --benchmark FOLDER"),
    (["--long-side", "448", "--ignore-index", "255", "--limit", "3"],
     "--long-side and --ignore-index and --limit apply only with --benchmark FOLDER"),
])
def test_an_option_given_without_the_one_it_needs_is_refused_even_at_its_default(synthetic, tiny_model, tmp_path,
                                                                                   extra, sentence):
    raster, labels, _ = synthetic
    report = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                 str(tiny_model), "--device", "cpu", "-q", "--json", str(report), *extra])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, lines
    assert isinstance(result.exception, SystemExit), result.exception  # a refusal, not a traceback
    assert lines == [f"Error: {lines[0][len('Error: '):]}"] and sentence in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written
