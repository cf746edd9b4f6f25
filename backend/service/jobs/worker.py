"""The job queue: one worker thread owns the model and runs jobs one at a time, in FIFO order.

JobManager is what the server talks to (submit, get, list, cancel, shutdown); JobControl is what
a running job sees (progress, messages, the cancel flag, the temporary names it will create).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.engine.errors import CancelledError, FarslipError, InputError
from backend.engine.temporary import new_run_tag

from .cleanup import JobTemporaries
from .model_cache import ModelCache
from .store import JobStore, new_job_id, now_iso

log = logging.getLogger("farslip.jobs")

# Progress is written to SQLite at most this often; readers see the live value in memory.
PROGRESS_WRITE_INTERVAL_S = 0.5
# Jobs that may wait for the worker at once (the running one aside): each holds its request in memory and
# in the history, and a client in a loop would otherwise queue hours of work.
MAX_QUEUED_JOBS = 100


class QueueFullError(FarslipError):
    """Too many jobs are waiting already: a later submit may succeed."""

    http_status = 429


@dataclass
class JobControl:
    """What a running job sees: progress and message reporting, and the cancel flag."""

    job_id: str
    manager: JobManager
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # Temporary names of this job carry its id (and this process's pid): see backend.engine.temporary.
    run_tag: str = ""
    # Set when the user (DELETE /v1/jobs/ID) asked for the cancel; a shutdown's cancel leaves it unset.
    cancelled_by_user: bool = False
    _attempt_start: float = field(default_factory=time.monotonic)
    _first_report: tuple[float, int] | None = None

    def should_cancel(self) -> bool:
        return self.cancel_event.is_set()

    def will_create(self, names: list[str | Path]) -> None:
        """Record temporary names in the job store before creating them: cleanup removes these only."""
        self.manager._record_temporary(self.job_id, [str(name) for name in names])

    def message(self, text: str) -> None:
        self.manager._update(self.job_id, message=text)

    def live_message(self, text: str) -> None:
        """A message that follows the progress (a training's steps): readers see it at once, and it is written
        to the store with the next progress report (at most every PROGRESS_WRITE_INTERVAL_S), not each time.
        Report the progress after it."""
        self.manager._live_message(self.job_id, text)

    def restart_timing(self) -> None:
        """A new attempt (e.g. after an out-of-memory retry): measure the ETA afresh."""
        self._attempt_start = time.monotonic()
        self._first_report = None

    def progress(self, tiles_done: int, tiles_total: int) -> None:
        now = time.monotonic()
        if self._first_report is None:
            self._first_report = (self._attempt_start, 0) if tiles_done else (now, 0)
        t0, done0 = self._first_report
        eta = None
        if tiles_total and tiles_done > done0:
            eta = (now - t0) / (tiles_done - done0) * (tiles_total - tiles_done)
        self.manager._report_progress(self.job_id, tiles_done, tiles_total, eta)


Runner = Callable[[dict, JobControl, ModelCache], dict]


class JobManager:
    """FIFO job queue with one worker thread; persists every job in a JobStore."""

    def __init__(self, store: JobStore, runners: dict[str, Runner], device: str = "cpu", features: Any = None,
                 max_queued: int = MAX_QUEUED_JOBS):
        self.store = store
        self.max_queued = max_queued
        self.runners = runners
        self.models = ModelCache(device, features)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._live: dict[str, dict] = {}
        self._outputs: dict[str, list[str]] = {}
        self.temporaries = JobTemporaries(store)
        self._controls: dict[str, JobControl] = {}
        self._last_write: dict[str, float] = {}
        self._lock = threading.RLock()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="farslip-worker", daemon=True)

    # -- lifecycle

    def start(self) -> None:
        self._worker.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the running one cleanly, mark the queued ones interrupted."""
        with self._lock:
            self._stopping = True
            for job_id, job in list(self._live.items()):
                if job["state"] == "queued":
                    self._finish(job_id, "interrupted",
                                 "The backend was shut down before this job started. Run it again.")
                elif job_id in self._controls:
                    # Not the user's cancel: the job ends `interrupted` (see _run), like the queued ones.
                    self._controls[job_id].cancel_event.set()
                    self._update(job_id, message="Stopping: the backend is shutting down.")
        self._queue.put(None)
        if self._worker.is_alive():
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.error("the running job did not stop within %.0f s; exiting anyway", timeout)

    # -- API used by the server

    def submit(self, kind: str, request: dict, outputs: list[str]) -> dict:
        """Queue a job; `outputs` are the files it will write (checked against other queued jobs)."""
        with self._lock:
            if self._stopping:
                raise InputError("The backend is shutting down; submit the job again once it has restarted.")
            waiting = sum(job["state"] == "queued" for job in self._live.values())
            if waiting >= self.max_queued:
                raise QueueFullError(f"{waiting} jobs are already waiting; wait for them to finish or cancel some "
                                     "(DELETE /v1/jobs/ID), then submit this one again.")
            wanted = {os.path.realpath(path) for path in outputs}
            for other_id, other_outputs in self._outputs.items():
                clash = wanted & {os.path.realpath(path) for path in other_outputs}
                if clash:
                    raise InputError(
                        f"Job {other_id} is already going to write {min(clash)}; wait for it to finish, "
                        "cancel it, or choose another output file.")
            job = {
                "id": new_job_id(), "kind": kind, "state": "queued", "progress": 0.0, "tiles_done": 0,
                "tiles_total": 0, "eta_s": None, "message": "Waiting for the jobs before it to finish.",
                "created": now_iso(), "started": None, "finished": None, "request": request,
                "result": None, "error": None,
            }
            self.store.insert(job, outputs)
            self._live[job["id"]] = job
            self._outputs[job["id"]] = list(outputs)
            self._queue.put(job["id"])
        log.info("job %s (%s) queued", job["id"], kind)
        return dict(job)

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            if job_id in self._live:
                return dict(self._live[job_id])
        return self.store.get(job_id)

    def list(self, limit: int = 200) -> list[dict]:
        jobs = self.store.list(limit)
        with self._lock:
            return [dict(self._live.get(job["id"], job)) for job in jobs]

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued job at once, or ask a running one to stop after its current batch."""
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return self.store.get(job_id)
            if job["state"] == "queued":
                self._finish(job_id, "cancelled", "Cancelled before it started; nothing was written.")
            elif job_id in self._controls:
                self._controls[job_id].cancelled_by_user = True
                self._controls[job_id].cancel_event.set()
                self._update(job_id, message="Cancelling after the current batch.")
            return self.get(job_id)

    @property
    def loaded_model(self) -> str | None:
        return self.models.loaded_name

    # -- worker

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._start_and_run(job_id)
            except Exception as error:  # a bug in the bookkeeping: fail this job, keep the worker serving
                log.exception("job %s: the worker failed around the job", job_id)
                self._fail_anyway(job_id, error)

    def _start_and_run(self, job_id: str) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job is None or job["state"] != "queued" or self._stopping:
                return
            control = JobControl(job_id, self, run_tag=new_run_tag(job_id))
            self._controls[job_id] = control
            self._update(job_id, state="running", started=now_iso(), message="Starting.")
        self._run(job_id, dict(job), control)

    def _fail_anyway(self, job_id: str, error: Exception) -> None:
        """End a job whose bookkeeping failed: `failed` with a sentence, in memory and (if it can) on disk."""
        text = (f"The job failed with an unexpected error ({type(error).__name__}: {error}). "
                "The backend's log file has the details.")
        with self._lock:
            job = self._live.pop(job_id, None)
            self._outputs.pop(job_id, None)
            self._controls.pop(job_id, None)
            self._last_write.pop(job_id, None)
            if job is None:
                return
            job.update(state="failed", message=text, error=text, finished=now_iso(), eta_s=None, result=None)
            try:
                self.store.update(job)
            except Exception:
                log.exception("job %s: could not record its failure in the job history", job_id)

    def _run(self, job_id: str, job: dict, control: JobControl) -> None:
        started = time.monotonic()
        try:
            result = self.runners[job["kind"]](job["request"], control, self.models)
        except CancelledError:
            if self._stopping and not control.cancelled_by_user:
                self._finish(job_id, "interrupted", "The backend was shut down while this job was running; "
                                                    "nothing was written. Run it again.")
            else:
                self._finish(job_id, "cancelled", "Cancelled; nothing was written.")
        except FarslipError as error:
            self._finish(job_id, "failed", str(error), error=str(error))
        except Exception as error:  # a bug or an unexpected library error: keep serving, keep the log
            log.exception("job %s failed", job_id)
            text = (f"The job failed with an unexpected error ({type(error).__name__}: {error}). "
                    "The backend's log file has the details.")
            self._finish(job_id, "failed", text, error=text)
        else:
            # A runner that returns has put its outputs in place: a cancel that came after that is too
            # late, and undoing it would mean deleting finished files (perhaps replacing the user's).
            late = " The cancel came after the results were written." if control.should_cancel() else ""
            self._finish(job_id, "done", f"Done in {time.monotonic() - started:.1f} s.{late}", result=result)

    # -- state changes (always under the lock, always persisted)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return
            job.update(changes)
            self.store.update(job)

    def _live_message(self, job_id: str, text: str) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job is not None:
                job["message"] = text

    def _record_temporary(self, job_id: str, names: list[str]) -> None:
        with self._lock:
            self.temporaries.record(job_id, names)

    def _report_progress(self, job_id: str, tiles_done: int, tiles_total: int, eta_s: float | None) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return
            fraction = min(1.0, tiles_done / tiles_total) if tiles_total else 0.0
            job.update(tiles_done=tiles_done, tiles_total=tiles_total, eta_s=eta_s,
                       progress=max(job["progress"], round(fraction * 0.99, 4)))
            if job["kind"] == "segment":
                job["message"] = f"Segmenting: {tiles_done} of {tiles_total} tiles."
            now = time.monotonic()
            if now - self._last_write.get(job_id, 0.0) >= PROGRESS_WRITE_INTERVAL_S:
                self._last_write[job_id] = now
                self.store.update(job)

    def _finish(self, job_id: str, state: str, message: str, result: dict | None = None,
                error: str | None = None) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job is None:
                return
            # Only what the job recorded before creating it; on success the temporary names are gone anyway.
            try:
                self.temporaries.remove(job_id)
            except Exception as problem:  # cleanup must never take the worker down with it
                log.exception("job %s: removing its temporary files failed", job_id)
                note = (f" Its temporary files could not all be removed ({type(problem).__name__}: {problem}); "
                        "look for names containing '.farslip-' beside its outputs.")
                message += note
                error = error + note if error else error
            job.update(state=state, message=message, finished=now_iso(), eta_s=None, result=result, error=error)
            if state == "done":
                job["progress"] = 1.0
                job["tiles_done"] = job["tiles_total"]
            self.store.update(job)
            del self._live[job_id]
            self._outputs.pop(job_id, None)
            self._controls.pop(job_id, None)
            self._last_write.pop(job_id, None)
        log.info("job %s %s: %s", job_id, state, message)
        try:
            self.store.prune_finished()
        except Exception:  # an old history row that stays is no reason to fail the job
            log.exception("could not remove the oldest finished jobs from the history")
