"""Run a short blocking call (network, files) in a thread of its own and hand its result to the GUI thread.

Not QGIS's task manager: its pool has as many threads as cores, and Processing algorithms run in that
pool while they wait for the backend; a look-up for the backend queued behind them would never run
(two algorithms started together on a two-core machine waited for each other until their timeout).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal, pyqtSlot

Done = Callable[[Any, "BaseException | None"], None]


class _Delivery(QObject):
    """Lives in the GUI thread; a signal emitted from a worker thread reaches `deliver` through its event loop."""

    arrived = pyqtSignal(object)

    def __init__(self):
        super().__init__()
        self.arrived.connect(self.deliver)

    @pyqtSlot(object)
    def deliver(self, parcel) -> None:
        on_done, result, error = parcel
        on_done(result, error)


_delivery: _Delivery | None = None


def _delivery_in_gui_thread() -> _Delivery:
    global _delivery
    if _delivery is None:
        _delivery = _Delivery()
        _delivery.moveToThread(QgsApplication.instance().thread())
    return _delivery


def run_in_background(description: str, function: Callable[[], Any], on_done: Done) -> threading.Thread:
    """Call `function()` in a worker thread; `on_done(result, error)` runs later in the GUI thread."""
    delivery = _delivery_in_gui_thread()

    def work() -> None:
        result, error = None, None
        try:
            result = function()
        except Exception as failure:
            error = failure
        delivery.arrived.emit((on_done, result, error))

    thread = threading.Thread(target=work, name="farslip: " + description, daemon=True)
    thread.start()
    return thread
