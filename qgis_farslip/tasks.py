"""Run a blocking call (network, files) in QGIS's task manager and hand its result to the GUI thread."""

from __future__ import annotations

from typing import Any, Callable

from qgis.core import QgsApplication, QgsTask

# QgsTaskManager owns the C++ task; the Python wrapper must live until finished() ran.
_RUNNING: set[QgsTask] = set()


class CallTask(QgsTask):
    def __init__(self, description: str, function: Callable[[], Any],
                 on_done: Callable[[Any, BaseException | None], None]):
        # QgsTask.Hidden (QGIS >= 3.26) keeps these short calls out of the task list.
        super().__init__(description, QgsTask.Flags(int(QgsTask.CanCancel) | int(getattr(QgsTask, "Hidden", 0))))
        self.function = function
        self.on_done = on_done
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> bool:
        try:
            self.result = self.function()
        except Exception as error:
            self.error = error
        return True

    def finished(self, ok: bool) -> None:
        _RUNNING.discard(self)
        if not ok and self.error is None:
            self.error = RuntimeError("Cancelled.")
        self.on_done(self.result, self.error)


def run_in_background(description: str, function: Callable[[], Any],
                      on_done: Callable[[Any, BaseException | None], None]) -> CallTask:
    """Call `function()` in a worker thread; `on_done(result, error)` runs later in the GUI thread."""
    task = CallTask(description, function, on_done)
    _RUNNING.add(task)
    QgsApplication.taskManager().addTask(task)
    return task
