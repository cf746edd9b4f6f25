"""`farslip train --out FOLDER --overwrite` killed (SIGKILL, a power cut) while it puts the new model in place: the
previous model set aside, the new one not in yet. Before, FOLDER was missing and the previous model sat in a hidden
`.FOLDER.farslip-<tag>.bak` nobody mentioned: the next training, `--model FOLDER` and the server's restart said the
model was missing (or trained a new one beside it, the old one hidden for good). Now each of them rolls the commit
back from its journal (the previous model back, the trained one back in the working folder for --resume) or
finishes it when the new model was all in place, and says so in one sentence.

The kill is deterministic: a forked child counts its renames (and links) and kills itself right after the k-th,
for every k."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from killing import die_after
from training_data import fast_options

from backend.engine import models
from backend.engine.errors import InputError
from backend.engine.finetuned import FINETUNED_FORMAT, FINETUNED_META, FINETUNED_WEIGHTS
from backend.service.jobs.store import JobStore, now_iso
from training.model_folder import (CHECKPOINT_DIR, OWNER_FILE, claim, default_out_folder, move_into_place,
                                   partial_dir, start_work_folder)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")


def write_model(folder: Path, text: str) -> None:
    folder.mkdir(parents=True)
    (folder / FINETUNED_META).write_text(json.dumps({"format": FINETUNED_FORMAT, "which": text}))
    (folder / FINETUNED_WEIGHTS).write_text(text)
    (folder / CHECKPOINT_DIR).mkdir()
    (folder / CHECKPOINT_DIR / "state.pt").write_text(text)


def model_of(folder: Path) -> dict[str, str] | None:
    if not folder.is_dir():
        return None
    return {str(path.relative_to(folder)): path.read_text() for path in sorted(folder.rglob("*")) if path.is_file()}


OLD = {FINETUNED_WEIGHTS: "OLD", f"{CHECKPOINT_DIR}/state.pt": "OLD",
       FINETUNED_META: json.dumps({"format": FINETUNED_FORMAT, "which": "OLD"})}
NEW = {FINETUNED_WEIGHTS: "NEW", f"{CHECKPOINT_DIR}/state.pt": "NEW",
       FINETUNED_META: json.dumps({"format": FINETUNED_FORMAT, "which": "NEW"})}


def killed_move(folder: Path, kill_after: int, report: bool) -> int:
    """Lay out a previous model at folder/model and a finished training in its working folder, then move it into
    place in a child killed right after its `kill_after`-th rename (or link); returns how many it made in all."""
    out = folder / "model"
    write_model(out, "OLD")
    write_model(partial_dir(out), "NEW")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the training's process
        try:
            os.close(reader)
            claim(partial_dir(out))
            calls = die_after(kill_after, "replace", "rename", "link")
            move_into_place(partial_dir(out), out, (folder / "run.json", "NEW report") if report else None)
            os.write(writer, str(calls[0]).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as stream:
        said = stream.read()
    _pid, status = os.waitpid(child, 0)
    if said:
        assert os.WIFEXITED(status), status
        return int(said)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return -1


def left(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("report", [True, False], ids=["with --json", "without --json"])
def test_the_restarted_server_puts_the_previous_model_back_after_a_kill_at_any_rename(tmp_path, report):
    total = killed_move(tmp_path / "whole", 10**6, report)
    assert total >= 2
    assert model_of(tmp_path / "whole" / "model") == NEW
    for kill_after in range(1, total + 1):
        folder = tmp_path / f"killed-after-{kill_after}"
        assert killed_move(folder, kill_after, report) == -1
        out = folder / "model"
        store = JobStore(tmp_path / f"jobs-{kill_after}.sqlite")
        job = {"id": f"{kill_after:032x}", "kind": "train", "state": "running", "progress": 0.99, "tiles_done": 0,
               "tiles_total": 0, "eta_s": None, "message": "Training.", "created": now_iso(), "started": now_iso(),
               "finished": None, "request": {"out": str(out), "overwrite": True}, "result": None, "error": None}
        store.insert(job, [str(out)])
        store.close()
        reopened = JobStore(tmp_path / f"jobs-{kill_after}.sqlite")  # the restarted server
        [interrupted] = reopened.mark_interrupted()
        reopened.close()
        message = interrupted["message"]
        if kill_after < total:  # not finished: the previous model back, the trained one kept for --resume
            assert model_of(out) == OLD, (kill_after, left(folder))
            assert model_of(partial_dir(out)) == {**NEW, OWNER_FILE: model_of(partial_dir(out))[OWNER_FILE]}
            assert left(folder) == [".model.partial", "model"], kill_after
            assert message == (
                f"The backend stopped while this job was running; {out} holds the previous model again: a training "
                f"that was replacing it was stopped midway; the trained model is kept in {partial_dir(out)}: run "
                "that training again with --resume to put it in place."), message
        else:  # the last rename was done: the new model (and its report), complete
            assert model_of(out) == NEW, left(folder)
            assert left(folder) == ["model", *(["run.json"] if report else [])]
            assert message.startswith(f"The backend stopped while this job was running; {out} holds the new model "
                                      "of a training that was stopped just after it put the model there"), message


def test_loading_the_model_puts_the_previous_one_back_and_says_so(tmp_path, caplog):
    killed_move(tmp_path, 1, report=True)  # the previous model set aside, the new one not in
    out = tmp_path / "model"
    assert not out.exists()
    with caplog.at_level("WARNING", logger="farslip.models"):
        assert models.locate_model(str(out)) == ("finetuned", out, None)
    assert model_of(out) == OLD
    assert [record.getMessage() for record in caplog.records] == [
        f"{out} holds the previous model again: a training that was replacing it was stopped midway; the trained "
        f"model is kept in {partial_dir(out)}: run that training again with --resume to put it in place."]
    assert left(tmp_path) == [".model.partial", "model"]


def test_a_recovery_another_process_is_making_is_left_to_it(tmp_path):
    """Two sweeps at once (a model load and the server's restart, say) recovered the same dead commit together:
    one put the previous model back while the other, a step behind, deleted it as the new one. A sweep now holds
    the commit's lock while it works; another sweep leaves that commit alone, and takes over a lock whose
    holder died."""
    from backend.engine.atomic import recover_dead_commits

    killed_move(tmp_path, 2, report=True)  # the new model in, the --json report not: to be rolled back
    out = tmp_path / "model"
    [journal] = [path for path in tmp_path.iterdir() if path.name.endswith(".commit.json")]
    lock = journal.with_name(journal.name.replace(".commit.json", ".commit.lock"))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(holder.pid))  # another process recovering it right now
        assert recover_dead_commits(tmp_path, out) == []
        assert model_of(out)[FINETUNED_WEIGHTS] == "NEW" and journal.is_file()  # untouched
    finally:
        holder.kill()
        holder.wait()
    [recovery] = recover_dead_commits(tmp_path, out)  # its holder died: taken over
    assert str(out) in recovery.restored and model_of(out) == OLD
    assert not lock.exists() and not journal.exists()


def test_a_replace_another_computer_is_making_in_a_shared_folder_is_left_to_it(tmp_path):
    """A models folder on a network drive, shared by two computers: a load of the model, the server's restart or a
    sweep of the folder on one computer found the journal of a training putting its model in place on the other,
    took its pid for a process of its own that had died, and rolled the replace back under it (the sweep then
    deleted the previous model set aside). A journal, a recovery lock and a training's owner file name their
    computer now; another computer's are left alone, as whether its process runs cannot be told from here."""
    from backend.engine.atomic import recover_dead_commits
    from backend.engine.errors import ModelError
    from backend.engine.temporary import remove_stale

    killed_move(tmp_path, 1, report=True)  # the previous model set aside, the new one not in yet
    out = tmp_path / "model"
    [journal] = [path for path in tmp_path.iterdir() if path.name.endswith(".commit.json")]
    written = json.loads(journal.read_text())
    assert written["host"] == socket.gethostname()
    journal.write_text(json.dumps({**written, "host": "the-other-computer"}))  # as the other computer wrote it
    (partial_dir(out) / OWNER_FILE).write_text(json.dumps({"pid": 1 << 22, "host": "the-other-computer"}))
    def everything() -> dict[str, str]:
        return {str(path.relative_to(tmp_path)): path.read_text() for path in sorted(tmp_path.rglob("*"))
                if path.is_file()}

    before = everything()  # the previous model set aside, the working folder, the journal, the staged report
    assert len(left(tmp_path)) == 4 and not out.exists()

    with pytest.raises(ModelError, match="does not exist"):  # not there yet: the other computer is putting it there
        models.locate_model(str(out))
    assert recover_dead_commits(tmp_path, out) == []
    remove_stale(tmp_path)
    with pytest.raises(InputError, match="A training on another computer is writing"):
        start_work_folder(out, resume=True, overwrite=False)
    assert everything() == before, left(tmp_path)

    journal.write_text(json.dumps(written))  # this computer's: its process is dead, so the replace is undone
    assert models.locate_model(str(out)) == ("finetuned", out, None) and model_of(out) == OLD


def test_a_finished_replace_whose_old_copy_cannot_go_says_the_new_model_is_complete(tmp_path, monkeypatch):
    """A reader who may not write the models folder loaded a model whose training was killed just after its last
    rename: every load warned that undoing the replace had failed, though the complete new model was in place
    and only the previous model's copy was left."""
    from backend.engine import atomic
    from backend.engine.finetuned import recover_model_folder

    total = killed_move(tmp_path / "whole", 10**6, report=False)
    folder = tmp_path / "done"
    assert killed_move(folder, total, report=False) == -1
    out = folder / "model"

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "_remove", refused)
    said = recover_model_folder(out)
    assert model_of(out)[FINETUNED_WEIGHTS] == "NEW"
    assert said.startswith(f"{out} holds the new model of a training that was stopped just after it put the model "
                           "there; it is complete; the previous model's copy could not be removed (the previous "
                           "model is kept as "), said
    assert said.endswith("): delete it when you no longer need it."), said


def test_the_next_training_puts_the_previous_model_back_before_it_replaces_it(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    killed_move(tmp_path, 2, report=True)  # the new model in, the --json report not: rolled back
    out = tmp_path / "model"
    said = []
    result = train_model_quietly(raster, labels, out, tiny_model, said)
    restored = (f"{out} holds the previous model again: a training that was replacing it was stopped midway; the "
                f"trained model is kept in {partial_dir(out)}: run that training again with --resume to put it in "
                "place.")
    assert said[0] == restored and result["warnings"][0] == restored
    # --overwrite then replaced the previous model (and discarded the one kept): nothing hidden is left behind.
    assert left(tmp_path) == ["model"]
    assert json.loads((out / FINETUNED_META).read_text())["format"] == FINETUNED_FORMAT
    assert (out / FINETUNED_WEIGHTS).read_text(errors="replace") != "OLD"


def train_model_quietly(raster, labels, out, tiny_model, said):
    from training.api import train_model

    def progress(_step, _total, info):
        if info.get("phase") == "warning":
            said.append(info["message"])

    return train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=1, lr=1e-3, overwrite=True,
                       options=fast_options(steps_per_epoch=1), progress=progress)


CHOOSE = r"""
import sys, time
from training.model_folder import default_out_folder
print(default_out_folder(sys.argv[1], sys.argv[2]), flush=True)
time.sleep(60)  # still loading its model
"""


def test_two_trainings_without_out_started_at_once_choose_different_folders(tmp_path, monkeypatch):
    """Each chose the first free name, but made nothing there until it had loaded its model and data: the second
    was refused as writing the first one's folder, or with --overwrite replaced the model the first had written."""
    monkeypatch.setenv("FARSLIP_MODELS", str(tmp_path / "models"))
    root = Path(__file__).resolve().parents[2]
    first = subprocess.Popen([sys.executable, "-c", CHOOSE, "/d/scene.tif", "/d/roofs.gpkg"], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert first.stdout is not None
        chosen = Path(first.stdout.readline().strip())
        assert chosen == tmp_path / "models" / "scene-roofs"
        second = default_out_folder("/d/scene.tif", "/d/roofs.gpkg")
        assert second == tmp_path / "models" / "scene-roofs-2"
        # The training then takes its own working folder over, never refused as another's.
        assert start_work_folder(second, resume=False, overwrite=False) == (partial_dir(second), False)
    finally:
        first.kill()
        first.wait()
