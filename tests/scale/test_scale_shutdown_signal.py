"""SIGTERM while a run on Ray shuts its local Ray down (Ray's shutdown resets SIGTERM to the default action at
the C level, and runs Python code a raising handler would cut short): the run says "Interrupted; ..." and exits
143, its finished chunks kept, and the Ray it started is shut down all the same. A real `farslip segment
--workers 1` in a child process whose ray.shutdown sends the signal to its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_scale_outputs import CLASSES, write_image

pytest.importorskip("ray")  # the ray extra: installed by `make setup`

REPO = Path(__file__).resolve().parents[2]
HARNESS = """
import os, signal, sys, time
import ray

real_shutdown = ray.shutdown


def shutdown(*args, **kwargs):
    if sys.argv[1] == "before":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    real_shutdown(*args, **kwargs)
    print("ray was shut down", file=sys.stderr, flush=True)
    if sys.argv[1] == "after":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)


ray.shutdown = shutdown
from backend.service.cli import app

app(sys.argv[2:], prog_name="farslip")
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigterm_while_ray_shuts_down_says_interrupted_and_exits_143(when, tiny_model, tmp_path):
    rasters = [write_image(tmp_path / "a.tif", 500000, 1), write_image(tmp_path / "b.tif", 500200, 2)]
    out = tmp_path / "out.gpkg"
    command = [sys.executable, "-c", HARNESS, when, "segment", *map(str, rasters), *CLASSES, "--model",
               str(tiny_model), "--out", str(out), "--workers", "1", "--quiet"]
    done = subprocess.run(command, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "ray was shut down" in done.stderr  # the whole shutdown ran, the signal held until it had
    assert done.stderr.rstrip().endswith("Interrupted; finished chunks are kept in out.gpkg.partial: run the same "
                                         "command again to resume."), done.stderr
    assert (out.parent / "out.gpkg.partial" / "manifest.jsonl").is_file() and not out.exists()
