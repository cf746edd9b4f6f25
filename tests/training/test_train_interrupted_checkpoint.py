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


INTERRUPT_IN_THE_REPLACE = """
import os, signal, sys
real = {name: getattr(os, name) for name in ("replace", "rename")}
def renamed(name):
    def call(source, target, *args, **kwargs):
        result = real[name](source, target, *args, **kwargs)
        if os.path.abspath(target) == os.environ["OUT"]:  # the trained model just put in place
            os.kill(os.getpid(), signal.SIGINT)
        return result
    return call
for name in real:
    setattr(os, name, renamed(name))
from backend.service.cli import app
app(sys.argv[1:], prog_name="farslip")
"""


def test_ctrl_c_while_the_model_is_put_in_place_says_it_is_in_place_and_leaves_it_whole(synthetic, tiny_model,
                                                                                        tmp_path):
    """Ctrl+C between the renames of --overwrite is held until the new model and its --json report are both in
    place, then delivered: the sentence says the model is complete, and the training's lock file (owner.json,
    removed right after the renames) no longer stays in the model folder."""
    raster, labels, _ = synthetic
    out, report = tmp_path / "model", tmp_path / "run.json"
    args = ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(out), "--base-model",
            str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu",
            "-q", "--json", str(report)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    before = json.loads((out / "farslip_model.json").read_text())

    done = subprocess.run([sys.executable, "-c", INTERRUPT_IN_THE_REPLACE, *args, "--overwrite", "--seed", "7"],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OUT": str(out)})
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Interrupted once the outputs were in place; they are complete: {out}, {report}.")
    after = json.loads((out / "farslip_model.json").read_text())
    assert after != before and json.loads(report.read_text())["model_dir"] == str(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "run.json"]
    assert "owner.json" not in {path.name for path in out.iterdir()}
