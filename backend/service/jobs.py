"""The backend's job queue: one worker thread owns the model and runs jobs one at a time, in FIFO order.

Jobs and their results are kept in a SQLite file in the state directory, so the
history survives a restart. A job that was queued or running when a previous
process died is marked `interrupted` at the next start, and whatever it may
have left half-written is removed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from backend.engine.errors import CancelledError, FarslipError, InputError
from backend.engine.options import SegmentOptions
from backend.engine.temporary import new_run_tag, remove_owned, run_prefixes
from backend.service.schemas import options_from_request

log = logging.getLogger("farslip.jobs")

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
JOB_FIELDS = ("id", "kind", "state", "progress", "tiles_done", "tiles_total", "eta_s", "message",
              "created", "started", "finished", "request", "result", "error")
# Progress is written to SQLite at most this often; readers see the live value in memory.
PROGRESS_WRITE_INTERVAL_S = 0.5


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------- history (SQLite)

class JobStore:
    """Job records in SQLite. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS jobs ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,"
                " state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, tiles_done INTEGER NOT NULL DEFAULT 0,"
                " tiles_total INTEGER NOT NULL DEFAULT 0, eta_s REAL, message TEXT NOT NULL DEFAULT '',"
                " created TEXT NOT NULL, started TEXT, finished TEXT, request TEXT NOT NULL, result TEXT,"
                " error TEXT, outputs TEXT NOT NULL DEFAULT '[]')"
            )
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "temporary" not in columns:  # a history written by an earlier version
                self._db.execute("ALTER TABLE jobs ADD COLUMN temporary TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: dict, outputs: list[str]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, progress, tiles_done, tiles_total, eta_s, message, created,"
                " started, finished, request, result, error, outputs) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job["id"], job["kind"], job["state"], job["progress"], job["tiles_done"], job["tiles_total"],
                 job["eta_s"], job["message"], job["created"], job["started"], job["finished"],
                 json.dumps(job["request"]), _dump(job["result"]), job["error"], json.dumps(outputs)),
            )

    def update(self, job: dict) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, progress=?, tiles_done=?, tiles_total=?, eta_s=?, message=?,"
                " started=?, finished=?, result=?, error=? WHERE id=?",
                (job["state"], job["progress"], job["tiles_done"], job["tiles_total"], job["eta_s"],
                 job["message"], job["started"], job["finished"], _dump(job["result"]), job["error"], job["id"]),
            )

    def record_temporary(self, job_id: str, names: list[str]) -> None:
        """Remember the temporary names a job is about to create (before it creates them)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET temporary=? WHERE id=?", (json.dumps(names), job_id))

    def temporary(self, job_id: str) -> list[str]:
        with self._lock:
            row = self._db.execute("SELECT temporary FROM jobs WHERE id=?", (job_id,)).fetchone()
        return json.loads(row["temporary"]) if row else []

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list(self, limit: int = 200) -> list[dict]:
        """The newest `limit` jobs, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job_from_row(row) for row in rows]

    def mark_interrupted(self) -> list[dict]:
        """Jobs a previous process left queued or running become `interrupted`; their temporary files go."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY seq").fetchall()
        interrupted = []
        for row in rows:
            job = _job_from_row(row)
            was_running = job["state"] == "running"
            removed = remove_owned(json.loads(row["temporary"]))
            job.update(
                state="interrupted", eta_s=None, finished=now_iso(),
                message=("The backend stopped while this job was running; nothing was written. Run it again."
                         if was_running else "The backend stopped before this job started. Run it again."),
            )
            self.update(job)
            log.warning("job %s was %s when the previous backend stopped: now interrupted%s", job["id"],
                        "running" if was_running else "queued",
                        f"; removed {', '.join(removed)}" if removed else "")
            interrupted.append(job)
        return interrupted


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _job_from_row(row: sqlite3.Row) -> dict:
    job = {name: row[name] for name in JOB_FIELDS}
    job["request"] = json.loads(job["request"])
    job["result"] = json.loads(job["result"]) if job["result"] else None
    return job


# --------------------------------------------------------------------------- the model the worker owns

class ModelCache:
    """Holds one loaded model; loads on first use, keeps it, swaps when a job asks for another."""

    def __init__(self, device: str, features: Any = None):
        self.device = device
        self.features = features  # a FeatureCache shared by segment jobs (features are keyed by weights)
        self._key: tuple | None = None
        self._loaded: Any = None
        self._lock = threading.RLock()

    @property
    def loaded_name(self) -> str | None:
        loaded = self._loaded
        return getattr(loaded, "name", None) if loaded is not None else None

    def unload(self) -> None:
        with self._lock:
            if self._loaded is not None:
                log.info("unloading model %s", self.loaded_name)
                self._key, self._loaded = None, None
                _free_device_memory()

    def get(self, model: str | None, weights: str | None, half: bool = False) -> Any:
        from backend.engine.models import load_model

        key = (model, weights, half)
        with self._lock:
            if self._key == key and self._loaded is not None:
                return self._loaded
            self.unload()
            self._loaded = load_model(model, weights=weights, device=self.device, half=half)
            self._key = key
            log.info("loaded model %s on %s", self.loaded_name, self.device)
            return self._loaded


def _free_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except (ImportError, RuntimeError) as error:  # freeing a cache must never fail a job
        log.debug("could not empty the CUDA cache: %s", error)


def is_out_of_memory(error: BaseException) -> bool:
    try:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# --------------------------------------------------------------------------- running jobs

@dataclass
class JobControl:
    """What a running job sees: progress and message reporting, and the cancel flag."""

    job_id: str
    manager: JobManager
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # Temporary names of this job carry its id (and this process's pid): see backend.engine.temporary.
    run_tag: str = ""
    _attempt_start: float = field(default_factory=time.monotonic)
    _first_report: tuple[float, int] | None = None

    def should_cancel(self) -> bool:
        return self.cancel_event.is_set()

    def will_create(self, names: list[str | Path]) -> None:
        """Record temporary names in the job store before creating them: cleanup removes these only."""
        self.manager._record_temporary(self.job_id, [str(name) for name in names])

    def message(self, text: str) -> None:
        self.manager._update(self.job_id, message=text)

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

    def __init__(self, store: JobStore, runners: dict[str, Runner], device: str = "cpu", features: Any = None):
        self.store = store
        self.runners = runners
        self.models = ModelCache(device, features)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._live: dict[str, dict] = {}
        self._outputs: dict[str, list[str]] = {}
        self._temporary: dict[str, list[str]] = {}
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
                    self._controls[job_id].cancel_event.set()
                    self._update(job_id, message="Cancelling: the backend is shutting down.")
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
            with self._lock:
                job = self._live.get(job_id)
                if job is None or job["state"] != "queued" or self._stopping:
                    continue
                control = JobControl(job_id, self, run_tag=new_run_tag(job_id))
                self._controls[job_id] = control
                self._update(job_id, state="running", started=now_iso(), message="Starting.")
            self._run(job_id, dict(job), control)

    def _run(self, job_id: str, job: dict, control: JobControl) -> None:
        started = time.monotonic()
        try:
            result = self.runners[job["kind"]](job["request"], control, self.models)
        except CancelledError:
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

    def _record_temporary(self, job_id: str, names: list[str]) -> None:
        with self._lock:
            recorded = self._temporary.setdefault(job_id, [])
            recorded.extend(name for name in names if name not in recorded)
            self.store.record_temporary(job_id, recorded)

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
            removed = remove_owned(self._temporary.pop(job_id, []))
            if removed:
                log.info("job %s: removed its temporary files %s", job_id, ", ".join(removed))
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


# --------------------------------------------------------------------------- segment jobs

def check_segment_job(options: SegmentOptions, device: str) -> list[str]:
    """The engine's checks before queueing, in `farslip segment`'s order (so a request with several
    faults gets the CLI's sentence); returns the files the job will write.

    Cheap: opens the raster (and reads the decimated sample the engine reads anyway), never the model.
    """
    import torch

    from backend.engine.checks import check_inputs, class_lines_of, output_paths
    from backend.engine.models import check_model
    from backend.engine.text import parse_class_lines

    check_inputs(options, device=torch.device(device))
    weights = str(options.weights) if options.weights else None
    check_model(options.model, weights)
    parse_class_lines(class_lines_of(options) or _finetuned_class_lines(options.model, weights))
    if options.refine == "sam":
        from backend.engine.sam_models import sam_location

        sam_location(options.sam_model)
    return [str(path) for path in output_paths(options).values()]


def _finetuned_class_lines(model: str | None, weights: str | None) -> list[str]:
    """A fine-tuned model folder's own classes (used when a request gives none)."""
    from backend.engine.finetuned import read_finetuned_meta
    from backend.engine.models import locate_model

    kind, where, _ = locate_model(model, weights)
    if kind != "finetuned":
        return []
    return list(read_finetuned_meta(where).get("class_lines") or [])


def run_segment(request: dict, control: JobControl, models: ModelCache) -> dict:
    """Worker side of a segment job: load (or reuse) the model, run the engine, retry smaller on GPU OOM."""
    from backend.engine.checks import output_paths
    from backend.engine.feature_cache import feature_cache_for
    from backend.engine.segment import segment_raster, with_model_defaults

    options = options_from_request(request)
    notices: list[str] = []
    control.message(f"Loading the model {options.model or 'default'}.")
    loaded = models.get(options.model, str(options.weights) if options.weights else None, options.half)
    options = with_model_defaults(options, loaded)
    cache = feature_cache_for(options.cache_features, options.cache_mb, models.features)
    control.will_create(run_prefixes([str(path) for path in output_paths(options).values()], control.run_tag))
    while True:
        if control.should_cancel():
            raise CancelledError("The run was cancelled; nothing was written.")
        control.message("Segmenting.")
        try:
            result = segment_raster(options, loaded, progress=control.progress, should_cancel=control.should_cancel,
                                    feature_cache=cache, notice=_notice(control, notices), run_tag=control.run_tag)
            break
        except Exception as error:
            if not is_out_of_memory(error) or options.batch_size is None or options.batch_size <= 1:
                raise
            _free_device_memory()
            options = replace(options, batch_size=max(1, options.batch_size // 2))
            log.warning("GPU out of memory: retrying with batch size %d", options.batch_size)
            control.message(f"The GPU ran out of memory; retrying with batch size {options.batch_size}.")
            control.restart_timing()
    features = {key: value for key, value in result.features.items() if key != "cache"}
    return {"outputs": dict(result.outputs), "classes": list(result.classes), "run_id": result.run_id,
            "tiles": result.tiles, "timings": dict(result.timings), "warnings": list(result.warnings) + notices,
            "quality": dict(result.report.get("quality") or {}),
            "features": features, "encoder": result.report.get("encoder")}


def _notice(control: JobControl, notices: list[str]) -> Callable[[str], None]:
    """Runtime fallbacks: in the log, the job's message and its result's warnings."""
    def notice(sentence: str) -> None:
        log.warning("%s", sentence)
        notices.append(sentence)
        control.message(sentence)

    return notice


# --------------------------------------------------------------------------- train jobs

def run_train(request: dict, control: JobControl, models: ModelCache) -> dict:
    """Worker side of a train job: training.api owns the method; the worker lends its device."""
    from training import api

    # Training changes the weights it is given and needs the memory: give it a fresh model and
    # drop the one segment jobs share (the next segment job loads it again).
    models.unload()
    request = {key: value for key, value in request.items() if value is not None}
    request.setdefault("device", models.device)
    control.message("Preparing the training data.")
    result = api.train_request(request, progress=control.progress, should_cancel=control.should_cancel,
                               message=control.message)
    return {"outputs": dict(result.get("outputs") or {"model_dir": result.get("model_dir")}), "classes": [],
            "metrics": result.get("metrics")}
