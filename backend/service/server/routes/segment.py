"""/v1/segment: a segment job, checked with the same engine checks as `farslip segment`."""

from __future__ import annotations

from fastapi import APIRouter, Request

from backend.engine.options import path_fields
from backend.engine.sam_models import known_sam_models
from backend.service.jobs import check_segment_job
from backend.service.schemas import JobCreated, SegmentRequest, options_from_request

from ..security import absolute_path, looks_like_path, output_path, raster_path, request_checks
from .jobs import manager_of, queue_job

router = APIRouter()

OUTPUT_FIELDS = ("out", "class_raster", "prob_raster")


def check_segment_request(request: SegmentRequest, device: str) -> list[str]:
    """Run the engine's checks on a request; returns the files the job will write.

    Raises the engine's InputError/ModelError, so the sentence is the one `farslip segment` prints.
    """
    for name in path_fields():
        value = getattr(request, name)
        if value is not None:
            check = output_path if name in OUTPUT_FIELDS else raster_path if name == "raster" else absolute_path
            check(value, name.replace("_", " "))
    # A model is a registry name (or, for `model`, a fine-tuned model's name) or an absolute path: the
    # server has no working folder a relative path could mean.
    if request.model is not None and looks_like_path(request.model):
        absolute_path(request.model, "model")
    if request.sam_model and request.sam_model not in known_sam_models():
        absolute_path(request.sam_model, "SAM model")
    return check_segment_job(options_from_request(request.model_dump()), device)


@router.post("/segment", response_model=JobCreated, status_code=202)
def submit_segment(body: SegmentRequest, request: Request):
    with request_checks():
        outputs = check_segment_request(body, manager_of(request).models.device)
    return queue_job(request, "segment", body, outputs)
