"""`farslip serve` on a damaged job history (jobs.sqlite): set aside under another name, a new one started, the
backend serves; a folder in its place is one sentence, exit 2."""

from __future__ import annotations

import sqlite3

import pytest


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 20)


def _another_database(path):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (name TEXT)")
        db.execute("INSERT INTO jobs VALUES ('not a farslip job')")
    db.close()


@pytest.mark.parametrize("damage", [_random_bytes, _another_database], ids=["not-a-database", "other-table"])
def test_a_damaged_job_history_is_set_aside_and_the_backend_starts(start_backend, tmp_path, damage):
    """Random bytes in jobs.sqlite ended the backend's startup in uvicorn's 'file is not a database' traceback
    (exit 3), every time, until the user found and deleted the file."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    history = state_dir / "jobs.sqlite"
    damage(history)
    before = history.read_bytes()

    backend = start_backend(state_dir)
    assert backend.client.get("/v1/jobs").json()["jobs"] == []
    kept = sorted(state_dir.glob("jobs.sqlite.damaged-*"))
    assert [path.name for path in kept if not path.name.endswith(("-wal", "-shm"))] == [kept[0].name]
    assert kept[0].read_bytes()[:100] == before[:100]  # set aside, not removed
    assert backend.stop() == 0
    stderr = (tmp_path / "state-stderr.txt").read_text()
    assert "Traceback" not in stderr
    said = f"the job history {history} could not be read"
    assert said in stderr and f"set aside as {kept[0]}" in stderr
    assert said in (state_dir / "logs" / "backend.log").read_text()
    with sqlite3.connect(history) as db:  # the new history is a whole one
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    db.close()


def test_a_folder_in_place_of_the_job_history_is_one_sentence(serve_refusal, tmp_path):
    """sqlite3's 'unable to open database file' ended the app's startup in a traceback (exit 3)."""
    history = tmp_path / "state" / "jobs.sqlite"
    history.mkdir(parents=True)
    (history / "keep.txt").write_text("mine")
    code, stderr = serve_refusal("--state-dir", str(tmp_path / "state"))
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip() == (f"Error: The job history {history} is a folder; move it out of the state folder, or "
                              "give the backend another --state-dir.")
    assert (history / "keep.txt").read_text() == "mine"
