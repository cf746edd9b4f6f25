"""Request and response bodies of the HTTP API (/v1), as pydantic models.

These models are the API's documentation too: FastAPI turns them into the
OpenAPI page at /docs. Unknown fields are refused (a typo in an option name
is an error, not a silently ignored setting).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from backend.service.http_words import for_http
from backend.engine.options import SENTENCE_MAX_CHARS, SegmentOptions, Spec, option_fields, path_fields, spec_of

# DESIGN's five states. A job whose backend stopped under it is "failed" with `interrupted` true (the job
# history's own state for it, "interrupted", is served so: routes/jobs.job_as_served).
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JobKind = Literal["segment", "train", "index", "search", "download", "evaluate"]

# Paths, names and class lines are short; these bounds keep a hostile body from
# making the server hold megabytes of strings in a job record.
ABSOLUTE = ("An absolute path on the backend's machine (e.g. /data/scene.tif; ~/ is expanded); a relative "
            "path is refused.")
PathText = Field(min_length=1, max_length=4096, description=ABSOLUTE)


def _whole(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (2.5 stays a float and is refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole_number(**bounds: Any) -> Any:
    """An integer in the schema that also takes 2.0, as JSON Schema's "integer" does (bounds: ge, le)."""
    # The bounds come before the validator, so that the schema shows them as minimum/maximum.
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


class Strict(BaseModel):
    """A request body: unknown fields, texts for numbers, booleans for numbers, NaN and infinities are
    refused; a whole number written as 8.0 is the integer 8 in every field (JSON has one number type)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, body: Any) -> Any:
        # A float field takes the integer as well, so only integer fields see a difference.
        if not isinstance(body, dict):
            return body
        return {name: [_whole(item) for item in value] if isinstance(value, list) else _whole(value)
                for name, value in body.items()}


class DeviceInfo(BaseModel):
    type: Literal["cpu", "cuda", "mps"]
    name: str
    free_memory_mb: int | None = None


class FeatureCacheInfo(BaseModel):
    """The image features the server keeps so that new classes on a seen extent skip the encoder."""

    entries: int
    memory_bytes: int
    memory_max_bytes: int
    disk_bytes: int
    disk_max_bytes: int
    hits: int
    misses: int


class Stopping(BaseModel):
    status: Literal["stopping"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    device: DeviceInfo
    loaded_model: str | None = None
    feature_cache: FeatureCacheInfo | None = None


class ModelInfo(BaseModel):
    name: str
    arch: str
    description: str = ""
    licence: str = ""
    context_length: int | None = None
    present: bool
    path: str | None = None
    loaded: bool = False
    kind: Literal["registry", "finetuned", "sam"] = "registry"
    languages: list[str] = Field(default_factory=lambda: ["en"],
                                 description="ISO 639-1 codes of the languages its text tower reads")
    multilingual: bool = False
    # Where a registry or SAM model's weights come from and are looked for (what the plugin tells a user to do
    # when they are missing); None for a fine-tuned model.
    hf_repo: str | None = None
    hf_file: str | None = None
    expected_path: str | None = None


class LoadedModelInfo(BaseModel):
    name: str = Field(description="as results name it (their `model` field) and GET /v1/health's loaded_model")
    kind: Literal["registry", "finetuned", "checkpoint"]
    path: str | None = Field(default=None, description="a fine-tuned model's folder, else the weights file read")
    weights_sha256: str


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    sam_models: list[ModelInfo] = Field(default_factory=list, description="SAM models for refine=sam")
    loaded: LoadedModelInfo | None = Field(default=None, description="the model the backend holds now (null before "
                                                                     "its first job): also a checkpoint file or a "
                                                                     "fine-tuned folder that no entry lists")


class PresetList(BaseModel):
    presets: dict[str, list[str]]


def _bounds(declared: Spec) -> dict[str, float]:
    """A declared range as pydantic bounds (shown as minimum/maximum on the OpenAPI page)."""
    bounds: dict[str, float] = {}
    if declared.range is not None and declared.range.low is not None:
        bounds["gt" if declared.range.low_open else "ge"] = declared.range.low
    if declared.range is not None and declared.range.high is not None:
        bounds["lt" if declared.range.high_open else "le"] = declared.range.high
    return bounds


def _epsg_number(value: Any) -> Any:
    """A CRS given as a number is its EPSG code (26914 is EPSG:26914); true and false stay refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"EPSG:{value}"
    return value


def crs_field() -> Any:
    """A CRS as the user types it (EPSG:26914, 26914, CRS84, WKT, PROJ) or an EPSG code as a whole number."""
    return Annotated[str, Field(max_length=10000), BeforeValidator(_epsg_number, json_schema_input_type=str | int)]


def _text_lines(value: Any) -> Any:
    """A list field given as one text: one item per line (the plugin's class box as it holds them), blank lines
    dropped. A list stays a list: a line break inside one of its items is refused (check_typed_text)."""
    if isinstance(value, str):
        # Lines end at \n, \r\n or \r only (str.splitlines also splits at \x1c, \x85, U+2028 ...: control and
        # separator characters inside a line stay in it and are refused there); a leading BOM is no text.
        text = value.removeprefix("\ufeff")
        return [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    return value


def _json_type(declared: Spec, kind: Any) -> tuple[Any, dict[str, Any]]:
    """(JSON-side type, Field arguments) of an option's non-None type."""
    if kind is Path or declared.gdal_name:
        return str, {"min_length": 1, "max_length": declared.max_chars}
    if typing.get_origin(kind) is tuple:  # coordinates: a list of fixed length
        size = len(typing.get_args(kind))
        return list[float], {"min_length": size, "max_length": size}
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        if element is int:
            element = whole_number(**_bounds(declared))
        elif declared.item_max_chars:
            element = Annotated[element, Field(max_length=declared.item_max_chars)]
        if declared.text_lines:
            return (Annotated[list[element], BeforeValidator(_text_lines, json_schema_input_type=list[element] | str)],
                    {"max_length": declared.max_items})
        return list[element], {"min_length": 1 if declared.parse else None, "max_length": declared.max_items}
    if declared.crs:
        return crs_field(), {}
    if declared.choices is not None:
        return Literal[declared.choices], {}
    if kind is int:
        return whole_number(**_bounds(declared)), {}
    if kind is float:
        return float, _bounds(declared)
    return kind, {"max_length": declared.max_chars}


def _request_field(item: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    """(type, pydantic Field) of one segment option in the request body: paths are absolute texts,
    coordinate tuples lists, choices literals; ranges are enforced (a 422 naming the field)."""
    declared = spec_of(item)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    inner = next(arg for arg in typing.get_args(annotation) if arg is not type(None)) if optional else annotation
    kind, constraints = _json_type(declared, inner)
    if optional:
        kind = kind | None
    description = for_http(declared.help, "segment") + (" " + ABSOLUTE if inner is Path or declared.gdal_name else "")
    if declared.text_lines:
        description += " A list, or one text with an item per line (blank lines dropped)."
    if declared.argument or declared.required_in_api:
        default: dict[str, Any] = {}
    elif item.default_factory is not dataclasses.MISSING:
        default = {"default_factory": item.default_factory}
    else:
        default = {"default": item.default}
    constraints = {key: value for key, value in constraints.items() if value is not None}
    return kind, Field(**default, **constraints, description=description)


SegmentRequest = create_model(  # type: ignore[call-overload]
    "SegmentRequest", __base__=Strict,
    __doc__="The options of `farslip segment`, as JSON (generated from backend.engine.options.SegmentOptions). "
            "Paths are absolute paths on the backend's machine.",
    **{item.name: _request_field(item, typing.get_type_hints(SegmentOptions)[item.name])
       for item in option_fields()},
)


def options_from_request(request: dict[str, Any]) -> SegmentOptions:
    """A (validated) POST /v1/segment body -> SegmentOptions (the one API conversion): `~` expanded."""
    from backend.engine.files import expand_user, is_gdal_name, refuse_folder_name
    from backend.engine.options import OUTPUT_FILES

    values = dict(request)
    for name in OUTPUT_FILES:
        if values.get(name):  # before a Path drops a trailing separator
            refuse_folder_name(values[name], f'"{name}"')
    for name in path_fields():
        if values.get(name) and not is_gdal_name(values[name]):  # a GDAL name goes to GDAL as it is
            values[name] = expand_user(values[name], name.replace("_", " "))
    return SegmentOptions.from_values(values)


class TrainRequest(Strict):
    """The options of `farslip train`, as JSON; options beyond these are passed to the trainer, which checks
    their types and ranges (training.finetune.TrainOptions) before the job is queued."""

    model_config = ConfigDict(extra="allow")

    raster: str | list[Annotated[str, PathText]] = Field(
        min_length=1, max_length=4096,
        description="The raster to train on, or a list of rasters on one pixel grid (the tiles of one survey), "
                    "trained on as one mosaic (a VRT the backend keeps in $FARSLIP_HOME/mosaics, which the "
                    "model records). " + ABSOLUTE)
    labels: str = PathText
    class_field: str = Field(min_length=1, max_length=200)
    out: str | None = Field(default=None, min_length=1, max_length=4096,
                            description="The folder to write the model into (default: a new folder in the backend's "
                                        "models folder, named after the raster and labels, that GET /v1/models "
                                        "lists). " + ABSOLUTE)
    base_model: str | None = Field(default=None, max_length=4096)
    method: str | None = Field(default=None, max_length=100)
    epochs: whole_number(ge=1, le=100000) | None = None
    background: str | None = Field(default=None, max_length=1000)
    overwrite: bool = False
    lr: float | None = Field(default=None, gt=0, description="learning rate (default: the method's)")
    patch_loss_weight: float | None = Field(default=None, ge=0)
    weights: str | None = Field(default=None, min_length=1, max_length=4096, description=ABSOLUTE)
    aoi: str | None = Field(default=None, min_length=1, max_length=4096,
                            description="polygons limiting the labelled area. " + ABSOLUTE)
    class_names: dict[Annotated[str, Field(max_length=1000)], Annotated[str, Field(max_length=1000)]] | None = Field(
        default=None, max_length=1000, description="label value -> class name")
    bands: list[whole_number(ge=1)] | None = Field(default=None, min_length=1, max_length=3)
    scale: float | None = Field(default=None, gt=0)
    gsd_m: float | None = Field(default=None, gt=0)
    resume: bool = False
    device: str | None = Field(default=None, max_length=100)


class IndexRequest(Strict):
    """The options of `farslip index`, as JSON."""

    raster: str = PathText
    bbox: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                     description="xmin, ymin, xmax, ymax in bbox_crs (default: the whole raster)")
    bbox_crs: crs_field() | None = Field(default=None, description="CRS of bbox, e.g. EPSG:4326, 4326 or CRS84 "
                                                                   "(default: the raster's)")
    model: str | None = Field(default=None, max_length=4096)
    weights: str | None = Field(default=None, max_length=4096)
    bands: list[whole_number(ge=1)] | None = Field(default=None, min_length=1, max_length=3)
    batch_size: int | None = Field(default=None, ge=1, le=1024)


class SearchRequest(IndexRequest):
    """The options of `farslip search`, as JSON: sentences, or a `like` point, or both."""

    sentences: list[Annotated[str, Field(max_length=SENTENCE_MAX_CHARS)]] = Field(default_factory=list, max_length=32)
    keywords: list[Annotated[str, Field(max_length=SENTENCE_MAX_CHARS)]] | None = Field(
        default=None, max_length=32, description="one 'a; b' string per sentence (default: split automatically)")
    use_keywords: bool = True
    top: int = Field(default=20, ge=1, le=10000)
    like: list[float] | None = Field(default=None, min_length=2, max_length=2, description="x, y in like_crs")
    like_crs: crs_field() | None = Field(default=None, description="CRS of like, e.g. EPSG:4326, 4326 or CRS84 "
                                                                   "(default: the raster's)")
    max_overlap: float = Field(default=0.5, gt=0, le=1)
    out: str = PathText
    overwrite: bool = False


class EvaluateRequest(Strict):
    """The options of `farslip evaluate`, as JSON: a model scored against labelled polygons."""

    raster: str = PathText
    labels: str = PathText
    class_field: str = Field(min_length=1, max_length=200)
    model: str | None = Field(default=None, max_length=4096)
    background: str | None = Field(default=None, max_length=1000)
    split: Literal["auto", "all", "validation"] = "auto"
    out_json: str | None = Field(default=None, min_length=1, max_length=4096,
                                 description="Where to write the metrics as JSON. " + ABSOLUTE)
    overwrite: bool = Field(default=False, description="Replace an existing out_json.")


class DownloadRequest(Strict):
    """POST /v1/models/download: fetch a registry or SAM model's weights from the hub (a job with progress)."""

    model: str = Field(min_length=1, max_length=200)


class JobCreated(BaseModel):
    job_id: str
    state: JobState


class ClassStat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", serialization_alias="class")
    class_id: int
    polygons: int
    area_m2: float


class JobResult(BaseModel):
    outputs: dict[str, str | None] = Field(default_factory=dict)
    classes: list[ClassStat] = Field(default_factory=list)
    metrics: dict[str, Any] | None = None
    run_id: str | None = None
    tiles: int | None = None
    timings: dict[str, Any] | None = None
    hits: list[dict[str, Any]] | None = None  # search jobs: rank, score, scale_m, query, bbox (raster CRS)
    index: dict[str, Any] | None = None
    notices: list[str] | None = None
    warnings: list[str] = Field(default_factory=list,
                                description="Sentences worth reading, e.g. classes a fine-tuned model was "
                                            "not trained on.")
    features: dict[str, int] | None = Field(default=None, description="segment jobs: tiles whose image features "
                                                                       "came from the cache / the encoder")
    encoder: str | None = Field(default=None, description="segment jobs: the runtime that ran the image encoder")
    quality: dict[str, Any] | None = Field(default=None, description="segment jobs: the label-free quality "
                                           "estimate (estimated_miou, calibration, region checks), as in the "
                                           "run report")


class Job(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    progress: float = Field(ge=0, le=1)
    tiles_done: int = 0
    tiles_total: int = 0
    eta_s: float | None = None
    message: str = ""
    created: str
    started: str | None = None
    finished: str | None = None
    request: dict[str, Any]
    result: JobResult | None = None
    error: str | None = None
    interrupted: bool = Field(default=False, description="the backend stopped (its process died, or it was shut "
                                                         "down) while this job was queued or running: the job is "
                                                         "failed and can be run again")


class JobList(BaseModel):
    jobs: list[Job]


class ErrorBody(BaseModel):
    detail: str
