"""Refusals that were silent or said the wrong thing: `farslip models --inspect ""` listed every model (exit 0),
as if --inspect were not given; evaluate-retrieval on a split whose images all have empty 'sentences' said the
split held no captioned image and that 'its splits are test' (the split it asked for)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from backend.service.cli import app


@pytest.mark.parametrize("name", ["", "   "])
def test_inspect_with_an_empty_name_is_refused(name):
    result = CliRunner().invoke(app, ["models", "--inspect", name])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("Error: --inspect needs a model: a registry name (see `farslip models`), a "
                                     "checkpoint file or a model folder.")


def test_a_split_whose_captions_are_all_empty_says_so(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for i, sentences in enumerate([[], [{"raw": "  "}]]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.jpg")
        entries.append({"filename": f"im{i}.jpg", "split": "test", "sentences": sentences})
    (tmp_path / "dataset_rsicd.json").write_text(json.dumps({"images": entries}))
    result = CliRunner().invoke(app, ["evaluate-retrieval", str(tmp_path), "--model", str(tiny_model), "--device",
                                      "cpu", "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        "Error: The 2 image(s) of dataset_rsicd.json in the split 'test' have no caption: their 'sentences' lists "
        "are empty (or hold only blank text); give each image its captions as {\"raw\": \"caption text\"} entries.")
