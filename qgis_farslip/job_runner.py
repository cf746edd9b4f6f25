"""One backend job at a time for a tab of the dock: its task, progress bar, Run/Cancel buttons, temp folders.

The Segment tab, the Train tab and the model download share it, so that every
job reports progress, cancel and failure the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal

from .client import Connection
from .jobs import JobTask

DONE, FAILED, CANCELLED = "done", "failed", "cancelled"


class JobRunner(QObject):
    updated = pyqtSignal(dict)          # the job, while it runs
    backendLost = pyqtSignal(str)       # nothing answered at the backend's URL (emitted before finished)
    finished = pyqtSignal(str, dict, str)  # "done"/"failed"/"cancelled", the job, the error sentence

    def __init__(self, progress_bar, run_buttons: list, cancel_button, parent: QObject | None = None):
        super().__init__(parent)
        self.progress_bar = progress_bar
        self.run_buttons = list(run_buttons)
        self.cancel_button = cancel_button
        self.task: JobTask | None = None
        self.failure_kind = ""  # of the last job that failed: jobs.LOST, jobs.REFUSED or ""
        self._temporary_dirs: list[str] = []

    @property
    def running(self) -> bool:
        return self.task is not None

    def temporary_dir(self, prefix: str = "farslip-") -> str:
        """A folder for the job's local copies, removed when the job ends however it ends."""
        folder = tempfile.mkdtemp(prefix=prefix)
        self._temporary_dirs.append(folder)
        return folder

    def remove_temporary_dirs(self) -> None:
        """Remove the folders `temporary_dir` gave: the job ended, or it was refused before it started."""
        for folder in self._temporary_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary_dirs = []

    def set_busy(self, busy: bool) -> None:
        for button in self.run_buttons:
            button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def start(self, description: str, connection: Connection, kind: str, request: dict[str, Any],
              prepare: Callable | None = None) -> JobTask:
        task = JobTask(description, connection, kind, request, prepare)
        task.jobUpdated.connect(self._updated)
        task.backendLost.connect(self.backendLost)
        task.succeeded.connect(lambda job: self._end(DONE, job, ""))
        task.failedWith.connect(lambda message: self._end(FAILED, task.job, message))
        task.cancelledJob.connect(lambda: self._end(CANCELLED, task.job, ""))
        self.task = task
        self.set_busy(True)
        self.progress_bar.setValue(0)
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> bool:
        if self.task is None:
            return False
        self.task.cancel()
        return True

    def _updated(self, job: dict) -> None:
        self.progress_bar.setValue(round(100 * float(job.get("progress") or 0.0)))
        self.updated.emit(job)

    def _end(self, state: str, job: dict, error: str) -> None:
        self.failure_kind = self.task.failure_kind if self.task is not None and state == FAILED else ""
        self.task = None
        self.set_busy(False)
        # A bar left at 100 % next to an error, or at 40 % after a cancel, would say the wrong thing.
        self.progress_bar.setValue(100 if state == DONE else 0)
        self.remove_temporary_dirs()
        self.finished.emit(state, dict(job or {}), error)
