"""A process killed (SIGKILL, a power cut) in the middle of renaming a run's outputs into place leaves them neither
mixed nor with the previous files hidden under backup names: the next sweep of the folder (the next run's, or the
server's restart for its jobs) rolls the unfinished commit back from its journal, or finishes one whose last rename
was done. Before, a.tif and its .aux.xml stayed new beside the old a.gpkg and report, the previous ones stayed
for good as hidden .bak files, and the server's job said "nothing was written".

The kill is deterministic: a child process commits with os.replace and os.link counted, and kills itself right
after the k-th of them, for every k."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.engine.temporary import remove_stale, run_prefixes
from backend.service.jobs.store import JobStore, now_iso

ROOT = Path(__file__).resolve().parents[2]
COMMIT = r"""
import errno, os, signal, sys
from pathlib import Path
from backend.engine.atomic import StagedOutputs
from backend.engine.temporary import new_run_tag
from tests.killing import die_after

folder, kill_after, links = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "links"

def no_link(*args, **kwargs):
    raise OSError(errno.EPERM, "no hard links on this file system")

tag = new_run_tag(sys.argv[4]) if len(sys.argv) > 4 else new_run_tag()
print(tag, flush=True)
outputs = {"class_raster": folder / "a.tif", "vector": folder / "a.gpkg", "extra": folder / "b.txt",
           "report": folder / "a.report.json"}
with StagedOutputs(outputs, tag) as staged:
    for key in outputs:
        staged[key].write_text("NEW")
    Path(str(staged["class_raster"]) + ".aux.xml").write_text("NEW")  # a sidecar of the raster
    if kill_after == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # killed before the commit
    calls = die_after(kill_after, "replace", *(["link"] if links else []))
    if not links:
        os.link = no_link
print("operations", calls[0], flush=True)
"""
# The previous run's files: a.tif's overviews (.ovr) are removed by the commit (the new raster has none), b.txt
# is new.
OLD = ("a.tif", "a.tif.aux.xml", "a.tif.ovr", "a.gpkg", "a.report.json")
NEW = ("a.tif", "a.tif.aux.xml", "a.gpkg", "b.txt", "a.report.json")


def lay_out(folder: Path) -> None:
    folder.mkdir()
    for name in OLD:
        (folder / name).write_text("OLD")


def commit(folder: Path, kill_after: int, links: bool, run_id: str | None = None) -> tuple[int, list[str]]:
    result = subprocess.run([sys.executable, "-c", COMMIT, str(folder), str(kill_after),
                             "links" if links else "no links", *([run_id] if run_id else [])],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    return result.returncode, result.stdout.split()


def contents(folder: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def operations(tmp_path: Path, links: bool) -> int:
    """How many renames (and links) a whole commit of this layout takes."""
    folder = tmp_path / "whole"
    lay_out(folder)
    code, said = commit(folder, 10**6, links)
    assert code == 0 and contents(folder) == dict.fromkeys(sorted(NEW), "NEW"), said
    return int(said[-1])


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "no hard links"])
def test_the_next_run_rolls_back_a_commit_killed_after_any_rename(tmp_path, links):
    total = operations(tmp_path, links)
    assert total >= 6
    for kill_after in range(1, total + 1):
        folder = tmp_path / f"killed-after-{kill_after}"
        lay_out(folder)
        code, _ = commit(folder, kill_after, links)
        assert code == -signal.SIGKILL
        remove_stale(folder)  # what the next `farslip segment` into this folder does first
        if kill_after < total:  # not finished: every output as it was
            assert contents(folder) == dict.fromkeys(sorted(OLD), "OLD"), kill_after
        else:  # the last rename was done: the run's outputs, complete
            assert contents(folder) == dict.fromkeys(sorted(NEW), "NEW"), kill_after


def interrupted_job(tmp_path: Path, folder: Path, kill_after: int) -> dict:
    """A segment job the server was killed in, at the `kill_after`-th rename of its commit, as the next start
    of the server reports it."""
    store = JobStore(tmp_path / f"jobs-{kill_after}.sqlite")
    job_id = f"{kill_after:032x}"
    outputs = [str(folder / name) for name in ("a.tif", "a.gpkg", "b.txt", "a.report.json")]
    job = {"id": job_id, "kind": "segment", "state": "running", "progress": 0.99, "tiles_done": 4,
           "tiles_total": 4, "eta_s": None, "message": "Segmenting: 4 of 4 tiles.", "created": now_iso(),
           "started": now_iso(), "finished": None, "request": {}, "result": None, "error": None}
    store.insert(job, outputs)
    code, said = commit(folder, kill_after, True, job_id)
    assert code == -signal.SIGKILL
    store.record_temporary(job_id, [str(name) for name in run_prefixes(outputs, said[0])])  # as the runner does
    store.close()
    reopened = JobStore(tmp_path / f"jobs-{kill_after}.sqlite")  # the restarted server
    [interrupted] = reopened.mark_interrupted()
    reopened.close()
    return interrupted


def test_the_restarted_server_rolls_back_its_jobs_commit_and_says_so(tmp_path):
    total = operations(tmp_path, True)
    folder = tmp_path / "midway"
    lay_out(folder)
    job = interrupted_job(tmp_path, folder, 2)
    assert contents(folder) == dict.fromkeys(sorted(OLD), "OLD")
    assert job["state"] == "interrupted"
    assert job["message"] == (
        "The backend stopped while this job was running, in the middle of putting its outputs in place: they were "
        "taken back and the previous files restored, so nothing was written. Run it again."), job["message"]

    folder = tmp_path / "finished"
    lay_out(folder)
    job = interrupted_job(tmp_path, folder, total)
    assert contents(folder) == dict.fromkeys(sorted(NEW), "NEW")
    assert job["message"] == (
        "The backend stopped while this job was running, just after it had written its outputs "
        f"({folder / 'a.tif'}, {folder / 'a.gpkg'}, {folder / 'b.txt'}, {folder / 'a.report.json'}); they are "
        "complete."), job["message"]

    folder = tmp_path / "before"
    lay_out(folder)
    job = interrupted_job(tmp_path, folder, 0)
    assert contents(folder) == dict.fromkeys(sorted(OLD), "OLD")
    assert job["message"] == "The backend stopped while this job was running; nothing was written. Run it again."


def test_a_journal_cut_short_is_a_commit_that_never_began(tmp_path):
    folder = tmp_path / "out"
    lay_out(folder)
    journal = folder / ".farslip-999999999-0123456789ab.commit.json"
    journal.write_text(json.dumps({"tag": "999999999-0123456789ab"})[:10])
    remove_stale(folder)
    assert contents(folder) == dict.fromkeys(sorted(OLD), "OLD")
