"""Backend jobs as cancellable QgsTasks: submit, poll GET /v1/jobs/{id}, cancel with DELETE.

All network calls happen in the task's worker thread; the GUI gets the job
dictionaries through queued signals and the final outcome in finished().
"""

from __future__ import annotations

import time
from typing import Any, Callable

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from .i18n import tr
from .client import FINAL_STATES, BackendClient, BackendError, BackendRefused, BackendUnreachable, Connection

POLL_INTERVAL_S = 0.3
LOST, REFUSED = "lost", "refused"  # JobTask.failure_kind: nothing answers at the backend; it refused the request
CANCEL_WAIT_S = 60.0


class PreparationError(Exception):
    """A job's preparation step (a local copy of the layer) failed; the message is a sentence for the user."""


class JobCancelled(Exception):
    """The user cancelled; the backend has stopped the job and written nothing."""


CANCEL_TOO_LATE = tr("The cancel came after the results were written; they are kept.")


class BackendStopped(BackendUnreachable):
    """The backend answered the submit, then stopped answering: it crashed, was killed or closed."""

    def __init__(self) -> None:
        super().__init__(tr("The FarSLIP backend stopped while the job was running (it crashed, ran out of "
                            "memory or was closed); nothing was loaded. Restart the backend and run again; "
                            "its log says why it stopped."))


def run_job(client: BackendClient, kind: str, request: dict[str, Any],
            on_update: Callable[[dict[str, Any]], None], is_cancelled: Callable[[], bool]) -> dict[str, Any]:
    """Submit a job and poll it until it ends (blocking): the finished job, JobCancelled or BackendError.

    A cancel that reaches a job as it finishes finds it done: its results are written (in a GeoPackage, beside
    the user's other layers) and the backend keeps them, so the finished job is returned, with
    `cancelled_too_late` set, not JobCancelled."""
    # Downloads are POST /v1/models/download; every other kind is POST /v1/<kind>.
    job_id = client.download_model(request["model"]) if kind == "download" else client.submit(kind, request)
    while True:
        try:
            job = client.job(job_id)
        except BackendUnreachable:
            raise BackendStopped() from None
        on_update(job)
        state = job.get("state")
        if state == "done":
            return job
        if state in FINAL_STATES:
            if state == "cancelled":
                raise JobCancelled()
            raise BackendError(job.get("error") or job.get("message") or f"The job ended {state}.")
        if is_cancelled():
            job = cancel_job(client, job)
            if job.get("state") != "done":
                raise JobCancelled()
            job = {**job, "cancelled_too_late": True}
            on_update(job)
            return job
        time.sleep(POLL_INTERVAL_S)


def cancel_job(client: BackendClient, job: dict[str, Any]) -> dict[str, Any]:
    """Ask the backend to cancel and wait until it has: the job as it ended (done when the cancel came after its
    results were written, which the backend keeps; the plugin deletes nothing either)."""
    client.cancel(job["id"])
    deadline = time.monotonic() + CANCEL_WAIT_S
    while job.get("state") not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        job = client.job(job["id"])
    return job


class JobTask(QgsTask):
    """Runs one backend job: `prepare()` (optional, in the worker thread), submit, poll until it ends."""

    jobUpdated = pyqtSignal(dict)
    backendLost = pyqtSignal(str)  # the backend's URL: nothing answered there (emitted before failedWith)
    succeeded = pyqtSignal(dict)
    failedWith = pyqtSignal(str)
    cancelledJob = pyqtSignal()

    def __init__(self, description: str, connection: Connection, kind: str, request: dict[str, Any],
                 prepare: Callable[[JobTask, dict[str, Any]], None] | None = None):
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.client = BackendClient(connection)
        self.kind = kind
        self.request = request
        self.prepare = prepare
        self.job: dict[str, Any] = {}
        self.error = ""
        self.failure_kind = ""  # LOST, REFUSED, or "" for any other failure
        self.cancelled_by_user = False

    def _update(self, job: dict[str, Any]) -> None:
        self.job = job
        self.setProgress(100.0 * float(job.get("progress") or 0.0))
        self.jobUpdated.emit(job)

    def run(self) -> bool:
        try:
            if self.prepare is not None:
                self.prepare(self, self.request)
            if self.isCanceled():
                raise JobCancelled()
            self.job = run_job(self.client, self.kind, self.request, self._update, self.isCanceled)
            return True
        except JobCancelled:
            # Ends as a completed task: QGIS would otherwise report a cancel as "Task failed".
            self.cancelled_by_user = True
            return True
        except PreparationError as error:
            self.failure_kind = REFUSED  # nothing was sent; the sentence says what to change
            self.error = str(error)
        except BackendError as error:
            self.failure_kind = (LOST if isinstance(error, BackendUnreachable) else
                                 REFUSED if isinstance(error, BackendRefused) else "")
            self.error = str(error)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
        return False

    def finished(self, ok: bool) -> None:
        # A task cancelled in the moment its job finished ends done: the job's results are written and kept.
        if self.cancelled_by_user or (self.isCanceled() and not ok):
            self.cancelledJob.emit()
        elif ok:
            self.succeeded.emit(self.job)
        else:
            if self.failure_kind == LOST:
                self.backendLost.emit(self.client.connection.url)
            self.failedWith.emit(self.error or tr("The job failed."))


def eta_text(job: dict[str, Any]) -> str:
    """'Tile 12 of 40, about 1 min 5 s left' from a job dictionary."""
    parts = []
    message = job.get("message") or ""
    done, total = job.get("tiles_done") or 0, job.get("tiles_total") or 0
    if total:
        parts.append(tr("tile {} of {}").format(done, total))
    elif message:
        parts.append(message)
    eta = job.get("eta_s")
    if eta is not None and job.get("state") == "running":
        eta = round(eta)
        parts.append(tr("about {} min {} s left").format(eta // 60, eta % 60) if eta >= 60
                     else tr("about {} s left").format(eta))
    if not parts:
        parts.append(job.get("state", ""))
    text = ", ".join(parts)
    return text[:1].upper() + text[1:]


def features_cached(job: dict[str, Any]) -> tuple[int, int]:
    """(tiles whose image features the backend had cached, all tiles) of a finished segment job."""
    features = (job.get("result") or {}).get("features") or {}
    cached, encoded = int(features.get("cached") or 0), int(features.get("encoded") or 0)
    return cached, cached + encoded
