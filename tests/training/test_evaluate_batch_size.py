"""`farslip evaluate --batch-size` out of range (-5, 0, 100000) was accepted, where segment, index,
evaluate-retrieval and the server refuse it: now the same sentence, before a model loads, in both modes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from backend.service.cli import app


@pytest.mark.parametrize("size", ["-5", "0", "1025", "100000"])
def test_a_batch_size_out_of_range_is_refused_in_segments_words(synthetic, tiny_model, tmp_path, size):
    raster, labels, _ = synthetic
    report = tmp_path / "metrics.json"
    result = CliRunner().invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                      str(tiny_model), "--device", "cpu", "-q", "--batch-size", size,
                                      "--json", str(report)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: The batch size must be a whole number from 1 to 1024; got {size}."
    assert not report.exists()


def test_a_benchmark_batch_size_out_of_range_is_refused_before_the_folder_is_read(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--benchmark", str(tmp_path), "-c", "water", "-c", "tree",
                                      "--model", str(tiny_model), "--device", "cpu", "-q", "--batch-size", "0"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "Error: The batch size must be a whole number from 1 to 1024; got 0."


def test_a_batch_size_in_range_runs(synthetic, tiny_model):
    raster, labels, _ = synthetic
    result = CliRunner().invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                      str(tiny_model), "--device", "cpu", "-q", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
