"""What a job leaves behind and who removes it: the temporary names it recorded, the device memory of a model.

A job records each temporary name (tagged with its run, see backend.engine.temporary) in the job
store *before* creating it; when the job ends, however it ends, exactly those are removed, and a
job a dead process left behind is cleaned up from the same record (JobStore.mark_interrupted).
Nothing else is ever removed: not the user's files, not another process's temporaries.
"""

from __future__ import annotations

import logging
import threading

from backend.engine.temporary import remove_owned

from .store import JobStore

log = logging.getLogger("farslip.jobs")


class JobTemporaries:
    """The temporary names each running job recorded; kept in memory and in the job store."""

    def __init__(self, store: JobStore):
        self.store = store
        self._names: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def record(self, job_id: str, names: list[str]) -> None:
        with self._lock:
            recorded = self._names.setdefault(job_id, [])
            recorded.extend(name for name in names if name not in recorded)
            self.store.record_temporary(job_id, recorded)

    def remove(self, job_id: str) -> list[str]:
        """Remove what job `job_id` recorded (on success the names are gone already); returns what went."""
        with self._lock:
            names = self._names.pop(job_id, [])
        removed = remove_owned(names)
        if removed:
            log.info("job %s: removed its temporary files %s", job_id, ", ".join(removed))
        return removed


def free_device_memory() -> None:
    """devices.release_device_memory, imported when needed (torch is not loaded with the job store)."""
    from backend.engine.devices import release_device_memory

    release_device_memory()
