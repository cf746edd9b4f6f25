"""`evaluate --split validation` with a model that no training wrote is refused; given by --weights, the sentence
said "the default model is not a fine-tuned model folder", though the default model was not the one used. It names
the model that would have been evaluated."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()
START = "Error: --split validation scores the held-out strip that farslip train kept aside, and "
END = " is not a fine-tuned model folder; evaluate it with --split all (or auto)."


@pytest.mark.parametrize("options, named", [
    (["--weights", "TINY"], "the weights file TINY"),
    (["--model", "clip-vit-b-16", "--weights", "TINY"], "clip-vit-b-16 with the weights file TINY"),
    (["--model", "TINY"], "TINY"),
    ([], "the default model (farslip2-vit-b-16)"),
])
def test_the_refusal_names_the_model_used(synthetic, tiny_model, options, named):
    raster, labels, _ = synthetic
    options = [str(tiny_model) if value == "TINY" else value for value in options]
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--split",
                                 "validation", "--device", "cpu", "-q", *options])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [START + named.replace("TINY", str(tiny_model)) + END]
