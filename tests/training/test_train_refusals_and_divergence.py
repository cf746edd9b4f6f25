"""`farslip train` and `farslip evaluate` refuse out-of-range options in one sentence before a model loads, and a
training whose loss stops being a finite number stops there with a sentence, never keeping (or resuming) what
diverged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from training_data import fast_options
from typer.testing import CliRunner

from backend.service.cli import app
from training import adapters
from training.api import train_model
from training.model_folder import load_tensors, save_tensors

runner = CliRunner()


def farslip(*args) -> tuple[int, list[str]]:
    result = runner.invoke(app, [*map(str, args), "--device", "cpu", "-q"])
    return result.exit_code, result.output.strip().splitlines()


def train_command(raster, labels, model, out, *extra) -> tuple[int, list[str]]:
    return farslip("train", raster, labels, "--class-field", "cls", "--out", out, "--base-model", model,
                   "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", *extra)


@pytest.mark.parametrize("extra, sentence", [
    (["--batch-size", "1000000"], "--batch-size must be a whole number from 1 to 256 (each step holds that many "
                                  "crops and their gradients in memory); got 1000000."),
    (["--lr", "1e300"], "--lr must be a number above 0 and at most 10 (higher rates make the training diverge); "
                        "got 1e+300."),
    (["--epochs", "20000"], "--epochs must be a whole number from 1 to 10000; got 20000."),
    (["--steps-per-epoch", "1000000"], "--steps-per-epoch must be at least 1 and at most 100000"),
    (["--class-name", "water=;"], "--class-name (class_names) renames the label value 'water' to ';', which names "
                                  "no class"),
    (["--background", "  "], "--background '  ' names no class (it is blank or made only of separators)"),
])
def test_train_refuses_an_option_out_of_range_before_the_model_loads(synthetic, tmp_path, extra, sentence):
    raster, labels, _ = synthetic
    # A base model that is not there: the option's sentence comes first, so nothing was loaded.
    code, lines = train_command(raster, labels, tmp_path / "no-model.safetensors", tmp_path / "model", *extra)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: {sentence}"), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model, sentence", [("", "Error: --base-model is empty: leave it out to use the default "),
                                              ("no-such-model", "Error: Unknown model 'no-such-model'.")])
def test_train_names_its_own_base_model_option_when_refusing_the_model(synthetic, tmp_path, model, sentence):
    """train takes the model by --base-model: the sentence says that, not segment's --model."""
    raster, labels, _ = synthetic
    code, lines = train_command(raster, labels, model, tmp_path / "model")
    assert code == 3 and lines[0].startswith(sentence) and "--model" not in " ".join(lines), lines
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_blank_background_and_the_validation_split_of_a_base_model(synthetic, tiny_model,
                                                                                       tmp_path):
    raster, labels, _ = synthetic
    code, lines = farslip("evaluate", raster, labels, "--class-field", "cls", "--model",
                          tmp_path / "no-model.safetensors", "--background", " ")
    assert code == 2 and lines == ["Error: --background ' ' names no class (it is blank or made only of "
                                   "separators); give the class name that unlabelled pixels should get, e.g. "
                                   "--background 'ground'."], lines
    code, lines = farslip("evaluate", raster, labels, "--class-field", "cls", "--model", tiny_model,
                          "--split", "validation")
    assert code == 2 and lines == [f"Error: --split validation scores the held-out strip that farslip train kept "
                                   f"aside, and {tiny_model} is not a fine-tuned model folder; evaluate it with "
                                   "--split all (or auto)."], lines


# `farslip train` whose loss overflows at its Nth step (as an overflowing learning rate or LoRA scale makes it).
OVERFLOW_AT_STEP = """
import os, sys
import training.finetune
total, calls = training.finetune.Trainer.total, [0]
def overflowing_total(self, parts):
    calls[0] += 1
    loss = total(self, parts)
    return loss * 1e38 * 1e38 if calls[0] == int(os.environ["OVERFLOW_AT"]) else loss
training.finetune.Trainer.total = overflowing_total
from backend.service.cli import app
app(sys.argv[1:], prog_name="farslip")
"""


def train_overflowing_at(step: int, raster, labels, model, out, *extra) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-c", OVERFLOW_AT_STEP, "train", str(raster), str(labels), "--class-field",
                           "cls", "--out", str(out), "--base-model", str(model), "--steps-per-epoch", "1",
                           "--batch-size", "2", "--device", "cpu", "-q", *map(str, extra)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OVERFLOW_AT": str(step)})
    # (The synthetic blocks are too small for region-category alignment: that has its own warning, left out here.)
    return done.returncode, [line for line in done.stderr.strip().splitlines()
                             if not line.startswith("Warning: Region-category alignment did not run")]


def test_a_diverging_training_stops_with_a_sentence_and_keeps_nothing(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    code, lines = train_overflowing_at(1, raster, labels, tiny_model, tmp_path / "model", "--epochs", "1")
    assert code == 2 and lines == [
        "Error: The training diverged at epoch 1 step 1 (the loss is inf, not a finite number); no model was "
        "written. Nothing was kept; start over with a lower --lr (this run used 0.0002)."], lines
    assert list(tmp_path.iterdir()) == []


def test_a_training_that_diverges_after_an_epoch_keeps_that_epoch_and_says_how_to_use_it(synthetic, tiny_model,
                                                                                         tmp_path):
    raster, labels, _ = synthetic
    out, partial = tmp_path / "model", tmp_path / ".model.partial"
    code, lines = train_overflowing_at(2, raster, labels, tiny_model, out, "--epochs", "2")
    assert code == 2 and lines == [
        "Error: The training diverged at epoch 2 step 1 (the loss is inf, not a finite number); no model was written. "
        f"The last finished epoch (1) is kept in {partial}: run the same command with --resume --epochs 1 to write "
        "the model from it (a resumed run keeps its --lr, so training on would diverge again), or start over with "
        "--overwrite and a lower --lr (this run used 0.0002)."], lines
    assert adapters.all_finite(load_tensors(partial / "checkpoint" / "last.safetensors").values())

    code, lines = train_command(raster, labels, tiny_model, out, "--epochs", "1", "--steps-per-epoch", "1",
                                "--resume")  # as the sentence says
    assert code == 0 and (out / "model.safetensors").is_file() and not partial.exists(), lines

    written = (out / "model.safetensors").read_bytes()  # trained on from its folder, it diverges again
    code, lines = train_overflowing_at(1, raster, labels, tiny_model, out, "--epochs", "2", "--resume")
    assert code == 2 and lines == [
        "Error: The training diverged at epoch 2 step 1 (the loss is inf, not a finite number); no model was written. "
        f"The model in {out} is left as it was (a resumed run keeps its --lr, so training it on would diverge again); "
        "start over with --overwrite and a lower --lr (this run used 0.0002)."], lines
    assert (out / "model.safetensors").read_bytes() == written and not partial.exists()


def test_a_checkpoint_with_weights_that_are_not_numbers_is_not_resumed(synthetic, tiny_model, tmp_path):
    """Such a checkpoint was kept by trainings that diverged before they were stopped; each --resume failed on
    it again."""
    raster, labels, _ = synthetic
    out = tmp_path / "model"

    def stop_in_epoch_two(step, total, info):
        if info.get("phase") == "train" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2,
                    options=fast_options(steps_per_epoch=1), progress=stop_in_epoch_two)
    last = tmp_path / ".model.partial" / "checkpoint" / "last.safetensors"
    save_tensors({name: torch.full_like(tensor, float("nan")) for name, tensor in load_tensors(last).items()}, last)
    code, lines = train_command(raster, labels, tiny_model, out, "--epochs", "2", "--steps-per-epoch", "1",
                                "--resume")
    assert code == 2 and lines == [
        f"Error: The training in {tmp_path / '.model.partial'} diverged (its checkpoint holds weights or losses "
        "that are not finite numbers), so it cannot be resumed; start over with --overwrite instead of --resume, "
        "and a lower --lr than 0.0002."], lines
    assert not out.exists()


@pytest.mark.parametrize("command, words", [("train", "there is nothing to train on"),
                                             ("evaluate", "there is nothing to evaluate")])
def test_an_all_nodata_raster_is_refused_in_the_words_of_the_command(command, words, shared_data, synthetic,
                                                                     tiny_model, tmp_path):
    """The raster check said "there is nothing to segment" to a training and an evaluation."""
    _, labels, _ = synthetic
    model = ["--base-model", tiny_model, "--out", tmp_path / "model"] if command == "train" else ["--model", tiny_model]
    code, lines = farslip(command, shared_data / "all-nodata.tif", labels, "--class-field", "cls", *model)
    assert code == 4 and words in " ".join(lines) and "segment" not in " ".join(lines), lines
    assert list(tmp_path.iterdir()) == []
