"""/v1/train and /v1/evaluate: fine-tuning and measuring a model on labelled polygons, as jobs."""

from __future__ import annotations

import dataclasses
import threading
import types
import typing
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from backend.engine.errors import FarslipError, InputError
from backend.engine.options import finite_number
from backend.service.schemas import EvaluateRequest, JobCreated, TrainRequest

from ..security import absolute_path, looks_like_path, output_path, raster_path, request_checks
from .jobs import manager_of, queue_job

router = APIRouter()

# Options of TrainRequest that name files (base_model only when it is a path, not a registry name).
TRAIN_PATHS = ("raster", "labels", "out", "weights", "aoi")
ACTIVE = ("queued", "running")


def _plain_type(annotation: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a TrainOptions annotation such as `int | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return (inner[0] if len(inner) == 1 else Any), True
    return annotation, False


def _option_value(name: str, annotation: Any, value: Any) -> Any:
    """A training option from JSON, as TrainOptions holds it; a wrong type is a sentence naming the option."""
    kind, optional = _plain_type(annotation)
    if value is None and optional:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        wanted = "true or false"
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wanted = "a whole number"
    elif kind is float:
        if finite_number(value):
            return float(value)
        wanted = "a number"
    elif kind is str:
        if isinstance(value, str):
            return value
        wanted = "a text"
    else:
        return value
    raise InputError(f"The training option {name} must be {wanted}" + (" or null" if optional else "")
                     + f"; got {str(value)[:100]!r}.")


def check_train_options(request: dict) -> None:
    """The trainer's options from JSON, typed as TrainOptions holds them, then checked by the trainer's
    own rules exactly as the job will build them (training.api.check_request_options)."""
    from training import api
    from training.finetune import TrainOptions

    hints = typing.get_type_hints(TrainOptions)
    values = {item.name: _option_value(item.name, hints[item.name], request[item.name])
              for item in dataclasses.fields(TrainOptions) if item.name in request}
    api.check_request_options({**request, **values})


def check_train_request(request: TrainRequest) -> list[str]:
    """The trainer's own quick checks; returns the model folder the job will write."""
    from backend.service.evaluate_jobs import check_labels

    body = request.model_dump(exclude_none=True)
    for name in TRAIN_PATHS:
        if isinstance(body.get(name), str):
            if name == "out":
                output_path(body[name], "out", example="/data/my-model")
            elif name == "raster":  # a GDAL name as segment takes it (NETCDF:"/d/a.nc":var, /vsizip//d/a.zip/x.tif)
                raster_path(body[name])
            else:
                absolute_path(body[name], name)
    if isinstance(body.get("base_model"), str) and looks_like_path(body["base_model"]):
        absolute_path(body["base_model"], "base model")
    try:
        from training import api
    except ImportError:
        raise FarslipError("This backend cannot train: the training package is not installed.") from None
    outputs = list(api.check_request(body))
    check_labels(body["labels"], body["class_field"])
    check_train_options(body)
    from training.labels import check_two_classes

    check_two_classes(body["labels"], body["class_field"], body.get("background"), body.get("class_names"))
    return outputs


def default_out(body: TrainRequest, request: Request, raster: str) -> str:
    """A train request without "out": a new folder in this backend's models folder, as `farslip train` without
    --out, past the folders that queued and running trainings will write."""
    from training.model_folder import default_out_folder

    if body.resume:
        raise InputError('"resume" continues the training of the folder "out" names: give it.')
    waiting = [job for job in manager_of(request).list() if job["kind"] == "train" and job["state"] in ACTIVE]
    taken = [str(job["request"]["out"]) for job in waiting if (job.get("request") or {}).get("out")]
    return str(default_out_folder(raster, body.labels, taken))


# A default "out" is chosen past the folders queued trainings will write, and its job queued, as one step: two
# requests at once would both choose the same folder, and the second be refused as writing what the first does.
_CHOOSING_OUT = threading.Lock()


@router.post("/train", response_model=JobCreated, status_code=202)
def submit_train(body: TrainRequest, request: Request):
    from backend.engine.mosaic import mosaic_of

    with _CHOOSING_OUT, request_checks():
        rasters = body.raster if isinstance(body.raster, list) else [body.raster]
        for raster in rasters:
            raster_path(raster)  # a GDAL name as segment takes it
        chosen = body.out is None
        if chosen:
            body.out = default_out(body, request, rasters[0])  # recorded in the job's request: its history says where
        try:
            # Several tiles: their kept VRT mosaic is the raster trained on (and recorded in the job's request).
            body.raster = mosaic_of(rasters)
            outputs = check_train_request(body)
            return queue_job(request, "train", body, outputs)
        except BaseException:
            if chosen:  # a refused request keeps no claim on the name (other trainings would skip to NAME-2)
                from training.model_folder import release_reservation

                release_reservation(Path(body.out))
            raise


@router.post("/evaluate", response_model=JobCreated, status_code=202)
def submit_evaluate(body: EvaluateRequest, request: Request):
    from backend.service.evaluate_jobs import check_evaluate_request

    with request_checks():
        raster_path(body.raster)  # a GDAL name as segment takes it
        absolute_path(body.labels, "labels")
        if body.out_json:
            output_path(body.out_json, "out_json", example="/data/metrics.json")
        if body.model is not None and looks_like_path(body.model):
            absolute_path(body.model, "model")
        outputs = check_evaluate_request(body.model_dump())
    return queue_job(request, "evaluate", body, outputs)
