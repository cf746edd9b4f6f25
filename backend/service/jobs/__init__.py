"""The backend's jobs: queued, run one at a time by a worker thread that owns the model, kept in a history.

    store.py        the job history (SQLite in the state folder); interrupted jobs at the next start
    worker.py       the FIFO queue and its worker thread (JobManager), what a running job sees (JobControl)
    model_cache.py  the one model the worker keeps loaded
    cleanup.py      the temporary names a job recorded, removed when it ends; device memory freed
    runners.py      what the worker runs for each kind of job; a segment request's checks before queueing
"""

from .cleanup import JobTemporaries, free_device_memory
from .model_cache import ModelCache
from .runners import check_segment_job, default_runners, is_out_of_memory, run_segment, run_train
from .store import JobStore, is_job_id
from .worker import JobControl, JobManager, QueueFullError, Runner

__all__ = ["JobControl", "JobManager", "JobStore", "JobTemporaries", "ModelCache", "QueueFullError", "Runner",
           "check_segment_job", "default_runners", "free_device_memory", "is_job_id", "is_out_of_memory",
           "run_segment", "run_train"]
