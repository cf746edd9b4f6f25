"""/v1/index and /v1/search: build a raster's search index, find places in it by sentence."""

from __future__ import annotations

from fastapi import APIRouter, Request

from backend.service.schemas import IndexRequest, JobCreated, SearchRequest

from ..security import checked_paths, request_checks
from .jobs import queue_job

router = APIRouter()


@router.post("/index", response_model=JobCreated, status_code=202)
def submit_index(body: IndexRequest, request: Request):
    from backend.service.search_jobs import check_index_request

    with request_checks():
        outputs = check_index_request(checked_paths(body, ()))
    return queue_job(request, "index", body, outputs)


@router.post("/search", response_model=JobCreated, status_code=202)
def submit_search(body: SearchRequest, request: Request):
    from backend.service.search_jobs import check_search_request

    with request_checks():
        outputs = check_search_request(checked_paths(body, ("out",)))
    return queue_job(request, "search", body, outputs)
