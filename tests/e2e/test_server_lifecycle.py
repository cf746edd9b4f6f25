"""`farslip serve` across process deaths: kill -9 mid-job and restart, graceful SIGTERM, one server per state dir."""

from __future__ import annotations

import signal
import sqlite3

import pytest


def _long_job(segment_body, out_dir):
    """The whole image upsampled 4x, one crop per batch: long enough to be caught mid-run."""
    return segment_body(out=str(out_dir / "long.gpkg"), bbox=None, scale=4.0, batch_size=1,
                        class_raster=str(out_dir / "long-classes.tif"))


def _wait_mid_run(backend, job_id):
    job = backend.wait(job_id, until=lambda job: job["tiles_done"] >= 3 or job["state"] not in
                       ("queued", "running"))
    assert job["state"] == "running", job
    return job


def test_kill_9_mid_job_then_restart_shows_it_interrupted_and_removes_its_partial_files(
        start_backend, segment_body, out_dir, tmp_path):
    state_dir = tmp_path / "state"
    backend = start_backend(state_dir)
    earlier = backend.submit(segment_body(out=str(out_dir / "earlier.gpkg")))
    assert backend.wait(earlier)["state"] == "done"
    before = sorted(p.name for p in out_dir.iterdir())
    long_id = backend.submit(_long_job(segment_body, out_dir))
    _wait_mid_run(backend, long_id)

    backend.stop(signal.SIGKILL)
    # The engine's scratch folder is still there: the dead process could not clean up.
    assert sorted(p.name for p in out_dir.iterdir()) != before
    with sqlite3.connect(state_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT state FROM jobs WHERE id=?", (long_id,)).fetchone()[0] == "running"

    restarted = start_backend(state_dir)
    job = restarted.job(long_id)
    assert job["state"] == "interrupted"
    assert job["finished"] and "stopped" in job["message"]
    assert sorted(p.name for p in out_dir.iterdir()) == before
    listed = {j["id"]: j for j in restarted.client.get("/v1/jobs").json()["jobs"]}
    assert listed[earlier]["state"] == "done"
    assert listed[earlier]["result"]["outputs"]["vector"] == str(out_dir / "earlier.gpkg")
    assert listed[long_id]["state"] == "interrupted"
    # The restarted backend works.
    again = restarted.submit(segment_body(out=str(out_dir / "again.gpkg")))
    assert restarted.wait(again)["state"] == "done"


def test_sigterm_cancels_the_running_job_cleanly_and_removes_the_connection_file(
        start_backend, segment_body, out_dir, tmp_path):
    state_dir = tmp_path / "state"
    backend = start_backend(state_dir)
    long_id = backend.submit(_long_job(segment_body, out_dir))
    queued_id = backend.submit(segment_body(out=str(out_dir / "queued.gpkg")))
    _wait_mid_run(backend, long_id)

    assert backend.stop(signal.SIGTERM, timeout=30) == 0
    assert not backend.connection_file.exists()
    assert list(out_dir.iterdir()) == []

    restarted = start_backend(state_dir)
    assert restarted.job(long_id)["state"] == "interrupted"
    assert restarted.job(queued_id)["state"] == "interrupted"
    assert restarted.job(queued_id)["started"] is None


def test_sigint_on_an_idle_server_exits_and_removes_the_connection_file(start_backend, tmp_path):
    backend = start_backend(tmp_path / "state")
    assert backend.client.get("/v1/health").status_code == 200
    backend.stop(signal.SIGINT, timeout=30)
    assert not backend.connection_file.exists()


def test_a_second_server_on_the_same_state_dir_is_refused(start_backend, tmp_path):
    state_dir = tmp_path / "state"
    first = start_backend(state_dir)
    with pytest.raises(RuntimeError, match="exited"):
        start_backend(state_dir)
    assert first.client.get("/v1/health").status_code == 200
    log = (tmp_path / "state-stderr.txt").read_text()
    assert "Another farslip backend is already using the state directory" in log
