"""The /v1 API, one module per area; each area's handlers check a request and queue it as a job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.security import HTTPBearer

from backend.service.schemas import ErrorBody

from . import jobs, models, search, segment, train

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 413, 422, 429)}


def v1_router() -> APIRouter:
    """Every /v1 endpoint, documented as needing the bearer token."""
    # Documents the scheme on /docs; the check itself is GuardMiddleware's, before the body is read.
    bearer = HTTPBearer(auto_error=False, description="The token from the backend's connection file.")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=ERROR_RESPONSES)
    for area in (models, segment, train, search, jobs):
        v1.include_router(area.router)
    return v1
