"""The job history: every job's request, state, progress and result in a SQLite file in the state folder.

The history survives a restart: a job a previous process left queued or running is marked
`interrupted` at the next start, a commit of its outputs it was killed in the middle of is rolled back
(backend.engine.atomic.recover_commit), and the temporary names it recorded are removed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backend.engine.errors import InputError
from backend.engine.temporary import remove_owned, run_journals

log = logging.getLogger("farslip.jobs")

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
# The history keeps the newest this many finished jobs (done, failed, cancelled, interrupted); older rows
# go, never their output files, and never a queued or running job.
KEEP_FINISHED_JOBS = 1000
# The history's file and those SQLite keeps beside it (set aside together: a journal left behind would be
# replayed into the new history).
HISTORY_SIDECARS = ("", "-wal", "-shm", "-journal")
JOB_FIELDS = ("id", "kind", "state", "progress", "tiles_done", "tiles_total", "eta_s", "message",
              "created", "started", "finished", "request", "result", "error")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


class DamagedHistory(Exception):
    """The file is an SQLite database, but not a readable job history."""


class JobStore:
    """Job records in SQLite. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path, keep_finished: int = KEEP_FINISHED_JOBS):
        self.path = Path(path)
        self.keep_finished = keep_finished
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            raise InputError(f"The job history {self.path} is {'a folder' if self.path.is_dir() else 'not a file'}; "
                             "move it out of the state folder, or give the backend another --state-dir.")
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.OperationalError as error:  # cannot be opened (permissions, a full disk): not damage
            raise InputError(f"Cannot open the job history {self.path} ({error}); make it readable and writable "
                             "by this user, or give the backend another --state-dir.") from None
        except (sqlite3.DatabaseError, DamagedHistory) as error:  # not a database, malformed, another schema
            kept = self._set_aside()
            log.warning("the job history %s could not be read (%s): it was set aside as %s and a new, empty "
                        "history started", self.path, error, kept)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        """Connect and make sure the file is a whole job history (the table made or brought up to date)."""
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            os.chmod(self.path, 0o600)
            db.row_factory = sqlite3.Row
            # Read before anything is written: a file set aside is left as it was found.
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise DamagedHistory("; ".join(str(problem) for problem in problems[:3]))
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            missing = sorted({"seq", *JOB_FIELDS, "outputs"} - columns) if columns else []
            if missing:
                raise DamagedHistory(f"its table of jobs has no {', '.join(missing)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs ("
                " seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,"
                " state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, tiles_done INTEGER NOT NULL DEFAULT 0,"
                " tiles_total INTEGER NOT NULL DEFAULT 0, eta_s REAL, message TEXT NOT NULL DEFAULT '',"
                " created TEXT NOT NULL, started TEXT, finished TEXT, request TEXT NOT NULL, result TEXT,"
                " error TEXT, outputs TEXT NOT NULL DEFAULT '[]')"
            )
            if "temporary" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
                # a history written by an earlier version
                db.execute("ALTER TABLE jobs ADD COLUMN temporary TEXT NOT NULL DEFAULT '[]'")
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self) -> Path:
        """Rename the damaged history (with its journal and shared memory) to `jobs.sqlite.damaged-<stamp>`, never
        removing it: the jobs it held may still be read from it. Returns its new name."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        kept = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        number = 1
        while any(Path(f"{kept}{suffix}").exists() for suffix in HISTORY_SIDECARS):
            number += 1
            kept = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{number}")
        for suffix in HISTORY_SIDECARS:
            try:
                os.replace(f"{self.path}{suffix}", f"{kept}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as error:
                raise InputError(f"The job history {self.path} is damaged and cannot be set aside "
                                 f"({error.strerror or error}); move it out of the state folder, or give the "
                                 "backend another --state-dir.") from None
        return kept

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

    def prune_finished(self) -> int:
        """Forget all but the newest `keep_finished` finished jobs (their rows only: the files they wrote
        stay); returns how many went."""
        finished = ", ".join(f"'{state}'" for state in FINAL_STATES)
        with self._lock:
            cursor = self._db.execute(
                f"DELETE FROM jobs WHERE state IN ({finished}) AND seq NOT IN "
                f"(SELECT seq FROM jobs WHERE state IN ({finished}) ORDER BY seq DESC LIMIT ?)",
                (self.keep_finished,))
        return cursor.rowcount

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
            recorded = json.loads(row["temporary"])
            # Before its staged files go: a commit it was killed in the middle of is rolled back (or finished).
            recoveries = _recover_commits(job["id"], recorded)
            try:
                removed = remove_owned(recorded)
            except Exception:  # a name it cannot remove must not keep the backend from starting
                log.exception("job %s: could not remove the temporary files it recorded", job["id"])
                removed = []
            kept = _kept_training(job) if was_running and job["kind"] == "train" else None
            job.update(
                state="interrupted", eta_s=None, finished=now_iso(),
                message=(f"The backend stopped while this job was running; {kept}" if kept else
                         _stopped_running(job, recoveries, json.loads(row["outputs"])) if was_running else
                         "The backend stopped before this job started. Run it again."),
            )
            self.update(job)
            log.warning("job %s was %s when the previous backend stopped: now interrupted%s", job["id"],
                        "running" if was_running else "queued",
                        f"; removed {', '.join(removed)}" if removed else "")
            interrupted.append(job)
        return interrupted


def _recover_commits(job_id: str, recorded: list[str]) -> list:
    """Roll back (or finish) the commits job `job_id` left journals of beside its recorded temporary names."""
    from backend.engine.atomic import recover_commit

    recoveries = []
    for journal in run_journals(recorded):
        try:
            recovery = recover_commit(journal)
        except Exception:  # must not keep the backend from starting: the journal stays for the next start
            log.exception("job %s: could not roll back the commit of %s", job_id, journal)
            continue
        if recovery is not None:
            log.warning("job %s: its commit was %s", job_id, "finished" if recovery.finished else
                        f"rolled back (restored {recovery.restored}, removed {recovery.removed}"
                        f"{', left: ' + '; '.join(recovery.left) if recovery.left else ''})")
            recoveries.append(recovery)
    return recoveries


def _stopped_running(job: dict, recoveries: list, outputs: list[str]) -> str:
    """The message of a job the backend stopped in: what became of its outputs."""
    stopped = "The backend stopped while this job was running"
    left = [item for recovery in recoveries for item in recovery.left]
    if left:
        return (f"{stopped}, in the middle of putting its outputs in place, and taking them back failed: "
                f"{'; '.join(left)}. Rename the previous files back, or delete them if they are not needed; then "
                "run it again.")
    if any(not recovery.finished for recovery in recoveries):
        return (f"{stopped}, in the middle of putting its outputs in place: they were taken back and the previous "
                "files restored, so nothing was written. Run it again.")
    written = [out for recovery in recoveries for out in recovery.outputs] or _written_since(job["started"],
                                                                                               outputs)
    if written:
        return f"{stopped}, just after it had written its outputs ({', '.join(written)}); they are complete."
    return f"{stopped}; nothing was written. Run it again."


def _written_since(started: str | None, outputs: list[str]) -> list[str]:
    """`outputs` when every one of them was written after `started` (the job had put them all in place before it
    stopped: they are committed together), else []."""
    if not started or not outputs:
        return []
    try:
        since = datetime.fromisoformat(started).timestamp()
        return outputs if all(os.path.getmtime(out) >= since for out in outputs) else []
    except (OSError, ValueError):
        return []


def _kept_training(job: dict) -> str | None:
    """A train job the previous backend was running: the sentence on the checkpoint it kept for resume, or
    None (then its working folder, with nothing to resume, is removed)."""
    out = (job.get("request") or {}).get("out")
    if not out:
        return None
    try:
        from training.model_folder import interrupted_training
    except ImportError:  # a backend installed without the training package
        return None
    try:
        return interrupted_training(Path(out))
    except OSError:
        log.exception("job %s: could not look at the working folder of %s", job["id"], out)
        return None


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _job_from_row(row: sqlite3.Row) -> dict:
    job = {name: row[name] for name in JOB_FIELDS}
    job["request"] = json.loads(job["request"])
    job["result"] = json.loads(job["result"]) if job["result"] else None
    return job
