"""Request and response bodies of the HTTP API (/v1), as pydantic models.

These models are the API's documentation too: FastAPI turns them into the
OpenAPI page at /docs. Unknown fields are refused (a typo in an option name
is an error, not a silently ignored setting).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

JobState = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
JobKind = Literal["segment", "train", "index", "search", "download", "evaluate"]
Attention = Literal["segearth", "clearclip", "sclip", "maskclip", "vanilla"]
Refine = Literal["none", "edges", "sam"]
Runtime = Literal["auto", "torch", "openvino", "onnxruntime"]
Language = Literal["auto", "en", "pt", "es", "fr", "de", "nl", "it", "zh", "ko", "ru"]

# Paths, names and class lines are short; these bounds keep a hostile body from
# making the server hold megabytes of strings in a job record.
ABSOLUTE = ("An absolute path on the backend's machine (e.g. /data/scene.tif; ~/ is expanded); a relative "
            "path is refused.")
PathText = Field(min_length=1, max_length=4096, description=ABSOLUTE)
ClassLine = Annotated[str, Field(max_length=1000)]


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
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    sam_models: list[ModelInfo] = Field(default_factory=list, description="SAM models for refine=sam")


class PresetList(BaseModel):
    presets: dict[str, list[str]]


class SegmentRequest(Strict):
    """The options of `farslip segment`, as JSON. Paths are absolute paths on the backend's machine."""

    raster: str = PathText
    class_lines: list[ClassLine] = Field(default_factory=list, max_length=256)
    preset: str | None = Field(default=None, max_length=100)
    bbox: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                     description="xmin, ymin, xmax, ymax in bbox_crs (default: the raster's CRS)")
    bbox_crs: str | None = Field(default=None, max_length=10000, description="EPSG:xxxx or WKT")
    model: str | None = Field(default=None, max_length=4096,
                              description="registry name, or the absolute path of a checkpoint file or "
                                          "fine-tuned model folder")
    weights: str | None = Field(default=None, min_length=1, max_length=4096, description=ABSOLUTE)
    bands: list[whole_number(ge=1)] | None = Field(default=None, min_length=1, max_length=3)
    threshold: float = 0.0
    attention: Attention = "segearth"
    batch_size: whole_number(ge=1, le=1024) | None = None
    runtime: Runtime = Field(default="auto", description="image encoder runtime; auto picks the fastest here")
    scale: float | None = Field(default=None, gt=0)
    gsd_m: float | None = Field(default=None, gt=0)
    min_area: float = Field(default=0.0, ge=0)
    simplify: float = Field(default=0.0, ge=0)
    value_range: list[float] | None = Field(default=None, min_length=2, max_length=2,
                                            description="min, max pixel values mapped to 0..255")
    refine: Refine = Field(default="none", description="refine outlines: none, edges (with the image) or sam")
    language: Language = Field(default="auto", description="language of the class names (prompt templates of a "
                                                           "multilingual model); auto detects it per name")
    quality_calibration: str | None = Field(default=None, min_length=1, max_length=4096,
                                            description="quality calibration file; " + ABSOLUTE)
    sam_model: str | None = Field(default=None, max_length=4096,
                                  description="SAM registry name or path, for refine=sam (default sam-vit-b)")
    out: str = PathText
    class_raster: str | None = Field(default=None, min_length=1, max_length=4096, description=ABSOLUTE)
    prob_raster: str | None = Field(default=None, min_length=1, max_length=4096, description=ABSOLUTE)
    overwrite: bool = False


class TrainRequest(BaseModel):
    """The options of `farslip train`, as JSON; options beyond these are passed to the trainer."""

    model_config = ConfigDict(extra="allow")

    raster: str = PathText
    labels: str = PathText
    class_field: str = Field(min_length=1, max_length=200)
    out: str = PathText
    base_model: str | None = Field(default=None, max_length=4096)
    method: str | None = Field(default=None, max_length=100)
    epochs: whole_number(ge=1, le=100000) | None = None
    background: str | None = Field(default=None, max_length=1000)
    overwrite: bool = False


class IndexRequest(Strict):
    """The options of `farslip index`, as JSON."""

    raster: str = PathText
    bbox: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                     description="xmin, ymin, xmax, ymax in bbox_crs (default: the whole raster)")
    bbox_crs: str | None = Field(default=None, max_length=10000)
    model: str | None = Field(default=None, max_length=4096)
    weights: str | None = Field(default=None, max_length=4096)
    bands: list[int] | None = Field(default=None, min_length=1, max_length=3)
    batch_size: int | None = Field(default=None, ge=1, le=1024)


class SearchRequest(IndexRequest):
    """The options of `farslip search`, as JSON: sentences, or a `like` point, or both."""

    sentences: list[Annotated[str, Field(max_length=2000)]] = Field(default_factory=list, max_length=32)
    keywords: list[Annotated[str, Field(max_length=2000)]] | None = Field(
        default=None, max_length=32, description="one 'a; b' string per sentence (default: split automatically)")
    use_keywords: bool = True
    top: int = Field(default=20, ge=1, le=10000)
    like: list[float] | None = Field(default=None, min_length=2, max_length=2, description="x, y in like_crs")
    like_crs: str | None = Field(default=None, max_length=10000)
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
    out_json: str | None = Field(default=None, min_length=1, max_length=4096)


class DownloadRequest(Strict):
    """POST /v1/models/download: fetch a registry model's weights from the hub (a job with progress)."""

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


class JobList(BaseModel):
    jobs: list[Job]


class ErrorBody(BaseModel):
    detail: str
