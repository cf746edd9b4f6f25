"""/v1/index and /v1/search: build a raster's search index, find places in it by sentence."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fastapi import APIRouter, Request

from backend.engine.errors import EmptyResultError
from backend.service.schemas import IndexRequest, JobCreated, SearchRequest

from ..security import checked_paths, request_checks
from .jobs import queue_job

router = APIRouter()


@contextlib.contextmanager
def nothing_to_index(raster: str) -> Iterator[None]:
    """An all-nodata raster refused in the words of index and search (the raster check speaks of segmenting),
    as `farslip index` and `farslip search` refuse it (search_index.open_index)."""
    try:
        yield
    except EmptyResultError:
        raise EmptyResultError(f"Every pixel of {raster} is nodata or masked: there is nothing to index or "
                               "search. Check the raster's nodata value and alpha band.") from None


@router.post("/index", response_model=JobCreated, status_code=202)
def submit_index(body: IndexRequest, request: Request):
    from backend.service.search_jobs import check_index_request

    with request_checks(), nothing_to_index(body.raster):
        outputs = check_index_request(checked_paths(body, ()))
    return queue_job(request, "index", body, outputs)


@router.post("/search", response_model=JobCreated, status_code=202)
def submit_search(body: SearchRequest, request: Request):
    from backend.service.search_jobs import check_search_request

    with request_checks(), nothing_to_index(body.raster):
        outputs = check_search_request(checked_paths(body, ("out",)))
    return queue_job(request, "search", body, outputs)
