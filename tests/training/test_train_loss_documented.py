"""What `farslip train` optimises is said where a user reads it: FarSLIP's global image-text contrastive loss
is left out (labels have no captions), the loss weights, and the weight decay with its exclusions."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from backend.service.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def test_train_help_says_the_loss_and_the_left_out_global_contrastive_loss():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    said = flat(result.output)
    assert "global image-text contrastive loss is left out" in said, said
    assert ("1.0 x dense patch cross-entropy + 0.1 x patch-to-patch distillation + 1.0 x region-category "
            "alignment") in said
    assert "weight decay 0.01 on weight matrices only" in said


def test_readme_training_section_says_the_loss_and_the_weight_decay():
    text = README.read_text(encoding="utf-8")
    section = flat(text[text.index("## Fine-tuning"):text.index("## Development")])
    assert "global image-text contrastive loss is left out" in section
    assert "0.1 x patch-to-patch distillation + 1.0 x region-category alignment" in section
    assert "weight decay 0.01 on the weight matrices only" in section
    assert "does not run, the run says so in a warning" in section
