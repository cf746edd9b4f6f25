"""The job worker in-process (no HTTP): out-of-memory retry, FIFO, history across restarts, partial-file cleanup."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from backend.service import jobs
from backend.engine.errors import InputError
from backend.service.jobs import JobManager, JobStore, remove_partial_outputs


def _wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition` until it is true; fail (never hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)


def _wait(manager: JobManager, job_id: str, timeout: float = 30) -> dict:
    _wait_until(lambda: manager.get(job_id)["state"] not in ("queued", "running"), timeout, f"job {job_id} to end")
    return manager.get(job_id)


def test_cuda_out_of_memory_retries_with_half_the_batch(monkeypatch, tmp_path, tiny_model, naip):
    tried = []

    def segment_raster(raster, options, outputs, loaded, progress=None, should_cancel=None, **_engine):
        tried.append(options.batch_size)
        if options.batch_size > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        progress(1, 1)
        return SimpleNamespace(outputs={"vector": str(outputs.out)}, classes=[], run_id="r", tiles=1,
                               timings={}, warnings=[], report={}, features={})

    monkeypatch.setattr("backend.engine.segment.segment_raster", segment_raster)
    store = JobStore(tmp_path / "jobs.sqlite")
    manager = JobManager(store, {"segment": jobs.run_segment})
    manager.start()
    job_id = manager.submit("segment", {"raster": str(naip), "class_lines": ["water"], "model": str(tiny_model),
                                        "out": str(tmp_path / "x.gpkg"), "batch_size": 32}, [])["id"]
    job = _wait(manager, job_id)
    manager.shutdown()
    assert job["state"] == "done", job
    assert tried == [32, 16, 8]


def test_out_of_memory_errors_are_recognised_by_type_and_message():
    assert jobs.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not jobs.is_out_of_memory(RuntimeError("shape mismatch"))


def test_jobs_run_one_at_a_time_in_submission_order(tmp_path):
    order, running = [], threading.Lock()

    def runner(request, control, models):
        assert running.acquire(blocking=False), "two jobs ran at once"
        try:
            order.append(request["n"])
            time.sleep(0.02)
        finally:
            running.release()
        return {"outputs": {}, "classes": []}

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    ids = [manager.submit("segment", {"n": n}, [])["id"] for n in range(6)]
    manager.start()
    for job_id in ids:
        assert _wait(manager, job_id)["state"] == "done"
    manager.shutdown()
    assert order == list(range(6))


def test_a_runner_error_fails_only_its_job(tmp_path):
    def runner(request, control, models):
        if request["n"] == 0:
            raise InputError("The raster /x.tif does not exist.")
        if request["n"] == 1:
            raise ZeroDivisionError("bug")
        return {"outputs": {}, "classes": []}

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    manager.start()
    ids = [manager.submit("segment", {"n": n}, [])["id"] for n in range(3)]
    states = [_wait(manager, job_id) for job_id in ids]
    manager.shutdown()
    assert states[0]["state"] == "failed" and states[0]["error"] == "The raster /x.tif does not exist."
    assert states[1]["state"] == "failed" and "ZeroDivisionError" in states[1]["error"]
    assert states[2]["state"] == "done"


def test_history_survives_a_restart_and_running_jobs_become_interrupted(tmp_path):
    out = tmp_path / "result.gpkg"
    store = JobStore(tmp_path / "jobs.sqlite")
    release = threading.Event()

    def runner(request, control, models):
        (tmp_path / ".result.0123456789ab.tmp.gpkg").write_text("half")
        out.write_text("written by the job")
        release.wait(10)
        return {"outputs": {}, "classes": []}

    manager = JobManager(store, {"segment": runner})
    manager.start()
    job_id = manager.submit("segment", {}, [str(out)])["id"]
    _wait_until(lambda: manager.get(job_id)["state"] == "running" and out.exists(), 30, "the job to write its output")
    # A new process opens the history while the old one is stuck mid-job (as if it had died).
    reopened = JobStore(tmp_path / "jobs.sqlite")
    interrupted = reopened.mark_interrupted()
    assert [job["id"] for job in interrupted] == [job_id]
    assert reopened.get(job_id)["state"] == "interrupted"
    assert not out.exists() and not (tmp_path / ".result.0123456789ab.tmp.gpkg").exists()
    assert reopened.mark_interrupted() == []
    release.set()
    manager.shutdown()


def test_partial_output_cleanup_leaves_files_the_job_did_not_touch(tmp_path):
    old = tmp_path / "result.gpkg"
    old.write_text("an earlier result")
    neighbour = tmp_path / "result.tif"
    neighbour.write_text("someone else's")
    assert remove_partial_outputs([str(old)], None) == []
    time.sleep(1.5)
    started = jobs.now_iso()
    assert remove_partial_outputs([str(old)], started) == []
    assert old.exists() and neighbour.exists()
