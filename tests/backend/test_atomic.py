"""Every file is written atomically: nothing under the final name until complete, no temporary left behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.engine.atomic import atomic_output, write_text_atomically
from backend.engine.errors import CancelledError
from backend.engine.feature_cache import FeatureCache
from backend.engine.temporary import remove_stale
from training.evaluate import write_json

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_output_replaces_on_success_with_sidecars(tmp_path):
    target = tmp_path / "classes.tif"
    target.write_text("old")
    with atomic_output(target) as temp_path:
        assert temp_path.parent == tmp_path and temp_path.suffix == ".tif" and temp_path != target
        temp_path.write_text("new")
        temp_path.with_name(temp_path.name + ".aux.xml").write_text("<PAMDataset/>")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.tif", "classes.tif.aux.xml"]


@pytest.mark.parametrize("name", ["metrics", "connection", "archive.tar.gz", ".hidden", "a.b.c.json"])
def test_a_file_lands_under_exactly_its_name_with_or_without_an_extension(tmp_path, name):
    # A name without an extension once landed as `name.tmp` (the staged name's suffix taken for the target's).
    write_text_atomically(tmp_path / name, "complete")
    assert sorted(os.listdir(tmp_path)) == [name]
    assert (tmp_path / name).read_text() == "complete"


def test_atomic_output_deletes_everything_on_cancel(tmp_path):
    target = tmp_path / "probs.tif"
    with pytest.raises(CancelledError), atomic_output(target) as temp_path:
        temp_path.write_text("half")
        temp_path.with_name(temp_path.name + ".aux.xml").write_text("x")
        raise CancelledError("cancelled")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_that_wrote_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_output(tmp_path / "x.tif"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_refused_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json({"miou": 0.5}, target)
    with pytest.raises(TypeError):  # refused half-way through serialising
        write_json({"miou": 0.7, "loss": object()}, target)
    assert json.loads(target.read_text()) == {"miou": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_refused_first_write_leaves_no_file_at_all(tmp_path):
    with pytest.raises(TypeError):
        write_json({"loss": object()}, tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_failing_half_way_leaves_no_final_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.pt"
    with pytest.raises(OSError), atomic_output(target) as staged:
        staged.write_bytes(b"first half")
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_secret_is_never_readable_by_others(tmp_path):
    path = write_text_atomically(tmp_path / "server.json", '{"token": "x"}', mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == '{"token": "x"}'


def test_a_killed_writer_leaves_a_temporary_that_the_next_run_sweeps(tmp_path):
    """SIGKILL cannot be caught: the half-written temporary stays, tagged, and remove_stale recognises it."""
    target = tmp_path / "result.gpkg"
    script = ("import os, sys\nfrom backend.engine.atomic import atomic_output\n"
              "with atomic_output(sys.argv[1]) as staged:\n"
              "    open(staged, 'w').write('half')\n    os._exit(9)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", script, str(target)], env=env).returncode == 9
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".result.gpkg.farslip-") and not target.exists()
    assert remove_stale(tmp_path) == [str(left)]
    assert list(tmp_path.iterdir()) == []


def test_the_feature_cache_ignores_a_crop_still_being_written(tmp_path):
    cache = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=1 << 20)
    cache.put("scope", (0, 0, 4, 4), np.ones((2, 2, 3), np.float32))
    (entry,) = (tmp_path / "scope").iterdir()
    (tmp_path / "scope" / f".{entry.name}.farslip-1-0123456789ab.tmp.npy").write_bytes(b"half")
    reopened = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=1 << 20)
    assert reopened.stats()["disk_bytes"] == entry.stat().st_size
    assert np.array_equal(reopened.get("scope", (0, 0, 4, 4)), np.ones((2, 2, 3), np.float32))


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_after_the_last_rename_still_removes_the_backups_then_is_delivered(tmp_path, monkeypatch,
                                                                                        number):
    """Ctrl+C while the previous outputs (kept as hidden backups) were being deleted left them for good beside
    the new outputs, under names no sweep removes."""
    from backend.engine import atomic

    targets = [tmp_path / "r.gpkg", tmp_path / "r.report.json"]
    for target in targets:
        target.write_text("previous")
    real = atomic._Renames.drop_backups

    def interrupted_midway(self):
        os.kill(os.getpid(), number)  # arrives while the backups are deleted
        real(self)

    monkeypatch.setattr(atomic._Renames, "drop_backups", interrupted_midway)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as farslip's CLI turns SIGTERM
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic.StagedOutputs({"vector": targets[0], "report": targets[1]}) as staged:
                staged["vector"].write_text("new")
                staged["report"].write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [t.read_text() for t in targets] == ["new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.gpkg", "r.report.json"]  # no backup left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("after", [1, 2, 3])
def test_an_interrupt_between_the_renames_leaves_every_output_new_and_no_previous_file_lost(
        tmp_path, monkeypatch, number, after):
    """Ctrl+C right after a rename (before it was recorded) undid the others but left that new file and deleted
    the only copy of the file it had replaced: old and new outputs mixed, a previous result gone, and the run
    said nothing was written. The interrupt now waits for the commit and says the outputs are complete."""
    from backend.engine import atomic

    targets = [tmp_path / "c.tif", tmp_path / "r.gpkg", tmp_path / "r.report.json"]
    for target in targets:
        target.write_text("previous")
    real_replace = os.replace
    renames = []

    def replace_then_interrupted(source, destination):
        real_replace(source, destination)
        renames.append(destination)
        if len(renames) == after:
            os.kill(os.getpid(), number)  # arrives right after the rename returns

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupted)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as farslip's CLI turns SIGTERM
    try:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            with atomic.StagedOutputs({"classes": targets[0], "vector": targets[1], "report": targets[2]}) as staged:
                for key in ("classes", "vector", "report"):
                    staged[key].write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [t.read_text() for t in targets] == ["new", "new", "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "r.gpkg", "r.report.json"]  # no backup left
    assert interrupt.value.outputs_written == [str(t) for t in targets]


def test_the_cli_says_an_interrupt_after_the_commit_left_complete_outputs(tmp_path, capsys):
    """The line after such an interrupt names the outputs as complete, not 'nothing was written'."""
    import typer

    from backend.service.cli_common import interrupted

    error = KeyboardInterrupt()
    error.outputs_written = [str(tmp_path / "r.gpkg"), str(tmp_path / "r.report.json")]
    with pytest.raises(typer.Exit) as stopped:
        interrupted(error)
    assert stopped.value.exit_code == 130
    said = capsys.readouterr().err
    assert "nothing was written" not in said and "complete" in said and "r.report.json" in said
