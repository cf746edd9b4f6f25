"""The job worker in-process (no HTTP): out-of-memory retry, FIFO, history across restarts, temporary-file cleanup."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import torch

from backend.engine.devices import BatchOutOfMemory
from backend.service import jobs
from backend.engine.errors import CancelledError, InputError
from backend.engine.temporary import make_work_dir, run_prefixes, staged_path, staged_stem
from backend.service.jobs import JobManager, JobStore


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

    def segment_raster(options, loaded, progress=None, should_cancel=None, **_engine):
        tried.append(options.batch_size)
        if options.batch_size > 8:  # as the engine's batch loop raises it (backend.engine.sliding)
            raise BatchOutOfMemory(options.batch_size,
                                   torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        progress(1, 1)
        return SimpleNamespace(outputs={"vector": str(options.out)}, classes=[], run_id="r", tiles=1,
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
    out.write_text("the user's earlier result")
    store = JobStore(tmp_path / "jobs.sqlite")
    release = threading.Event()
    created = []

    def runner(request, control, models):
        staged = staged_path(out, control.run_tag)
        control.will_create([staged_stem(out, control.run_tag)])
        staged.write_text("half")
        created.append(staged)
        release.wait(10)
        return {"outputs": {}, "classes": []}

    manager = JobManager(store, {"segment": runner})
    manager.start()
    job_id = manager.submit("segment", {}, [str(out)])["id"]
    _wait_until(lambda: manager.get(job_id)["state"] == "running" and bool(created), 30,
                "the job to write its temporary file")
    assert job_id in created[0].name
    # A new process opens the history while the old one is stuck mid-job (as if it had died).
    reopened = JobStore(tmp_path / "jobs.sqlite")
    interrupted = reopened.mark_interrupted()
    assert [job["id"] for job in interrupted] == [job_id]
    assert reopened.get(job_id)["state"] == "interrupted"
    assert not created[0].exists()
    assert out.read_text() == "the user's earlier result"
    assert reopened.mark_interrupted() == []
    release.set()
    manager.shutdown()


def test_a_failed_job_removes_only_the_names_it_recorded(tmp_path):
    """The user's files, a folder saved during the run and another process's temporary folder all stay."""
    out = tmp_path / "result.gpkg"
    out.write_text("the user's earlier result")
    other_process = tmp_path / ".farslip-1-0123456789ab"
    other_process.mkdir()
    (other_process / "classes.tif").write_text("another run's")
    saved_during_run = tmp_path / "notes"

    def runner(request, control, models):
        control.will_create(run_prefixes([out], control.run_tag))
        make_work_dir(tmp_path, control.run_tag)
        staged_path(out, control.run_tag).write_text("half")
        saved_during_run.mkdir()
        (saved_during_run / "a.txt").write_text("mine")
        raise InputError("The raster /x.tif does not exist.")

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    manager.start()
    job = _wait(manager, manager.submit("segment", {}, [str(out)])["id"])
    manager.shutdown()
    assert job["state"] == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".farslip-1-0123456789ab", "jobs.sqlite", "jobs.sqlite-shm", "jobs.sqlite-wal", "notes", "result.gpkg"])
    assert out.read_text() == "the user's earlier result"
    assert (saved_during_run / "a.txt").read_text() == "mine"


def test_a_cancel_after_the_results_were_written_keeps_them(tmp_path):
    out = tmp_path / "result.gpkg"
    started = threading.Event()
    cancelled = threading.Event()

    def runner(request, control, models):
        started.set()
        cancelled.wait(10)
        out.write_text("finished result")  # the runner had already put its results in place
        return {"outputs": {"vector": str(out)}, "classes": []}

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    manager.start()
    job_id = manager.submit("segment", {}, [str(out)])["id"]
    started.wait(10)
    manager.cancel(job_id)
    cancelled.set()
    job = _wait(manager, job_id)
    manager.shutdown()
    assert job["state"] == "done" and "after the results were written" in job["message"]
    assert out.read_text() == "finished result"


def test_a_cleanup_error_fails_only_its_job_and_the_worker_goes_on(tmp_path):
    """An error while removing a job's temporary names (here: a name that is not a tagged temporary
    name) ends that job with a sentence; the worker thread lives on and runs the next job."""

    def runner(request, control, models):
        if request["n"] == 0:
            control.will_create([str(tmp_path / "plain.gpkg")])
            raise InputError("The raster /x.tif does not exist.")
        return {"outputs": {}, "classes": []}

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    manager.start()
    first, second = (manager.submit("segment", {"n": n}, [])["id"] for n in range(2))
    second_job = _wait(manager, second, timeout=15)
    first_job = manager.get(first)
    manager.shutdown()
    assert second_job["state"] == "done"
    assert first_job["state"] == "failed"
    assert first_job["error"].startswith("The raster /x.tif does not exist.")
    assert "temporary files could not all be removed" in first_job["message"]


def test_a_bookkeeping_error_around_a_job_fails_it_and_the_worker_goes_on(tmp_path, monkeypatch):
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": lambda r, c, m: {"outputs": {}}})
    real_finish = manager._finish

    def finish(job_id, state, message, **kwargs):
        if manager.get(job_id)["request"]["n"] == 0:
            raise RuntimeError("disk I/O error")
        return real_finish(job_id, state, message, **kwargs)

    monkeypatch.setattr(manager, "_finish", finish)
    manager.start()
    first, second = (manager.submit("segment", {"n": n}, [])["id"] for n in range(2))
    assert _wait(manager, second, timeout=15)["state"] == "done"
    first_job = manager.get(first)
    manager.shutdown()
    assert first_job["state"] == "failed" and "RuntimeError: disk I/O error" in first_job["error"]


def test_a_restart_survives_a_recorded_name_it_cannot_remove(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    manager = JobManager(store, {})
    job_id = manager.submit("segment", {}, [])["id"]
    store.record_temporary(job_id, [str(tmp_path / "plain.gpkg")])
    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert [job["id"] for job in reopened.mark_interrupted()] == [job_id]
    assert reopened.get(job_id)["state"] == "interrupted"


def test_a_job_running_at_shutdown_is_interrupted_and_a_users_cancel_is_cancelled(tmp_path):
    started = threading.Event()

    def runner(request, control, models):
        started.set()
        _wait_until(control.should_cancel, 10, "the cancel")
        raise CancelledError("The run was cancelled; nothing was written.")

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": runner})
    manager.start()
    cancelled = manager.submit("segment", {}, [])["id"]
    started.wait(10)
    manager.cancel(cancelled)
    assert _wait(manager, cancelled)["state"] == "cancelled"
    started.clear()
    running = manager.submit("segment", {}, [])["id"]
    started.wait(10)
    manager.shutdown()
    job = manager.get(running)
    assert job["state"] == "interrupted", job
    assert "shut down while this job was running" in job["message"]


def test_a_full_queue_refuses_more_jobs_with_a_429_sentence_until_one_leaves(tmp_path):
    manager = JobManager(JobStore(tmp_path / "jobs.sqlite"), {"segment": lambda r, c, m: {"outputs": {}}},
                         max_queued=3)  # not started: every job stays queued
    ids = [manager.submit("segment", {"n": n}, [])["id"] for n in range(3)]
    try:
        manager.submit("segment", {"n": 3}, [])
    except jobs.QueueFullError as error:
        assert error.http_status == 429
        assert str(error).startswith("3 jobs are already waiting; wait for them to finish or cancel some")
    else:
        raise AssertionError("a fourth job was queued behind three waiting ones")
    assert len(manager.list()) == 3
    manager.cancel(ids[0])
    assert manager.submit("segment", {"n": 4}, [])["state"] == "queued"
    manager.shutdown()


def test_the_history_keeps_the_newest_finished_jobs_and_every_waiting_one(tmp_path):
    out = tmp_path / "result.gpkg"
    release = threading.Event()

    def runner(request, control, models):
        if request["n"] == "slow":
            release.wait(30)
        out.write_text("result")
        return {"outputs": {"vector": str(out)}}

    manager = JobManager(JobStore(tmp_path / "jobs.sqlite", keep_finished=2), {"segment": runner})
    manager.start()
    finished = [manager.submit("segment", {"n": n}, [])["id"] for n in range(4)]
    # Jobs run in order: once the last has ended, all have (the first ones may be pruned already then).
    _wait(manager, finished[-1])
    running = manager.submit("segment", {"n": "slow"}, [])["id"]
    waiting = manager.submit("segment", {"n": "last"}, [])["id"]
    _wait_until(lambda: manager.get(running)["state"] == "running", 30, "the slow job to start")
    ids = [job["id"] for job in manager.list(100)]
    assert ids == [waiting, running, finished[3], finished[2]]  # the oldest finished ones are gone
    assert manager.get(finished[0]) is None
    release.set()
    _wait(manager, waiting)
    assert [job["id"] for job in manager.list(100)] == [waiting, running]
    assert out.read_text() == "result"  # only history rows go, never a job's files
    manager.shutdown()
    reopened = JobStore(tmp_path / "jobs.sqlite", keep_finished=2)
    assert [job["id"] for job in reopened.list(100)] == [waiting, running]
    reopened.close()
