"""Ctrl+C during `farslip train`: the sentence says whether a finished epoch was kept, and a plain re-run
never discards a kept checkpoint without --overwrite."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from backend.service.cli import app

INTERRUPT_AT_STEP = """
import os, signal, sys
import training.finetune
step, calls = training.finetune.Trainer.step, [0]
def interrupted_step(self, rng):
    calls[0] += 1
    if calls[0] == int(os.environ["STOP_AT"]):
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, rng)
training.finetune.Trainer.step = interrupted_step
from backend.service.cli import app
app(sys.argv[1:], prog_name="farslip")
"""


def test_ctrl_c_says_what_was_kept_and_a_plain_rerun_keeps_the_checkpoint(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    out, partial = tmp_path / "model", tmp_path / ".model.partial"
    args = ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out), "--base-model",
            str(tiny_model), "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "-q"]

    def run(stop_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", INTERRUPT_AT_STEP, *args], capture_output=True, text=True,
                              timeout=300, env={**__import__("os").environ, "STOP_AT": str(stop_at)})

    first = run(1)  # in the first epoch: nothing to resume
    assert first.returncode == 130, first.stderr
    assert first.stderr.strip().splitlines()[-1] == (
        "Interrupted before an epoch finished; no model was written and nothing was kept (run the command "
        "again to start over).")
    assert not out.exists() and not partial.exists()

    second = run(2)  # in the second epoch: the first is kept
    assert second.returncode == 130, second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"Interrupted; no model was written. The last finished epoch is kept in {partial}: run the same command "
        "with --resume to continue from it.")
    state = partial / "checkpoint" / "state.pt"
    kept = state.read_bytes()

    runner = CliRunner()
    plain = runner.invoke(app, args)
    assert plain.exit_code == 2, plain.output
    assert plain.output.strip().splitlines() == [
        f"Error: An interrupted training of {out} kept its last finished epoch in {partial}; continue it with "
        "--resume, or start over with --overwrite (which discards it)."]
    assert state.read_bytes() == kept and not out.exists()

    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "farslip_model.json").read_text())["training"]["epochs_run"] == 2
    assert not partial.exists()
