"""/v1/train and /v1/evaluate: fine-tuning and measuring a model on labelled polygons, as jobs."""

from __future__ import annotations

from fastapi import APIRouter, Request

from backend.engine.errors import FarslipError
from backend.service.schemas import EvaluateRequest, JobCreated, TrainRequest

from ..security import absolute_path
from .jobs import queue_job

router = APIRouter()


def check_train_request(request: TrainRequest) -> list[str]:
    """The trainer's own quick checks; returns the model folder the job will write."""
    for name in ("raster", "labels", "out"):
        absolute_path(getattr(request, name), name)
    try:
        from training import api
    except ImportError:
        raise FarslipError("This backend cannot train: the training package is not installed.") from None
    return list(api.check_request(request.model_dump(exclude_none=True)))


@router.post("/train", response_model=JobCreated, status_code=202)
def submit_train(body: TrainRequest, request: Request):
    return queue_job(request, "train", body, check_train_request(body))


@router.post("/evaluate", response_model=JobCreated, status_code=202)
def submit_evaluate(body: EvaluateRequest, request: Request):
    from backend.service.evaluate_jobs import check_evaluate_request

    for name in ("raster", "labels", "out_json"):
        if getattr(body, name):
            absolute_path(getattr(body, name), name)
    return queue_job(request, "evaluate", body, check_evaluate_request(body.model_dump()))
