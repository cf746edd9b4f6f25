"""/v1/jobs: list, follow and cancel jobs; and how the other areas queue theirs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.service.http_words import job_for_http
from backend.service.jobs import JobManager, is_job_id
from backend.service.schemas import Job, JobCreated, JobList

from ..security import quoted, refuse_backend_files

router = APIRouter()


def manager_of(request: Request) -> JobManager:
    return request.app.state.manager


def queue_job(request: Request, kind: str, body: BaseModel, outputs: list[str]) -> JobCreated:
    """Queue a checked request as a job of `kind` that will write `outputs` (none of the backend's own files)."""
    refuse_backend_files(outputs, request.app.state.backend_files)
    job = manager_of(request).submit(kind, body.model_dump(), outputs)
    return JobCreated(job_id=job["id"], state=job["state"])


def job_as_served(job: dict) -> dict:
    """The job as a client reads it: http_words (the request's fields, not command-line flags), and one of
    DESIGN's five states. A job whose backend stopped under it (the history's `interrupted`: the process died, or
    was shut down, while it was queued or running) is `failed`, its sentence as message and error, opening with
    "Interrupted:", and `interrupted` true: a client that knows the five states stops polling it."""
    said = job_for_http(job)
    if said.get("state") != "interrupted":
        return {**said, "interrupted": False}
    sentence = said.get("message") or "The backend stopped while this job ran. Run it again."
    sentence = f"Interrupted: {sentence[:1].lower()}{sentence[1:]}"
    return {**said, "state": "failed", "interrupted": True, "message": sentence, "error": said.get("error") or sentence}


def job_or_404(job: dict | None, job_id: str) -> dict:
    """The job as a client reads it (job_as_served), or a 404."""
    if job is None:
        raise StarletteHTTPException(404, f"There is no job {quoted(job_id)}; GET /v1/jobs lists the jobs.")
    return job_as_served(job)


@router.get("/jobs", response_model=JobList)
def jobs(request: Request, limit: int = Query(200, ge=1, le=10000)):
    return {"jobs": [job_as_served(job) for job in manager_of(request).list(limit)]}


@router.get("/jobs/{job_id}", response_model=Job)
def job(job_id: str, request: Request):
    return job_or_404(manager_of(request).get(job_id) if is_job_id(job_id) else None, job_id)


@router.delete("/jobs/{job_id}", response_model=Job)
def cancel(job_id: str, request: Request):
    return job_or_404(manager_of(request).cancel(job_id) if is_job_id(job_id) else None, job_id)
