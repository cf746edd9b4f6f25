"""What the worker runs for each kind of job, and the checks a segment request passes before it is queued.

A runner takes (request, JobControl, ModelCache) and returns the job's result; the segment and train
runners live here, the others beside their commands (downloads, evaluate_jobs, search_jobs).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

from backend.engine.devices import is_out_of_memory  # noqa: F401 (backend.service.jobs exports it)
from backend.engine.devices import release_device_memory, retry_smaller_batches
from backend.engine.errors import CancelledError
from backend.engine.options import SegmentOptions
from backend.engine.temporary import run_prefixes
from backend.service.schemas import options_from_request

from .model_cache import ModelCache
from .worker import JobControl, Runner

log = logging.getLogger("farslip.jobs")


def default_runners() -> dict[str, Runner]:
    """The runner of each kind of job the server accepts."""
    from backend.service.downloads import run_download
    from backend.service.evaluate_jobs import run_evaluate
    from backend.service.search_jobs import run_index, run_search

    return {"segment": run_segment, "train": run_train, "index": run_index, "search": run_search,
            "download": run_download, "evaluate": run_evaluate}


def check_segment_job(options: SegmentOptions, device: str) -> list[str]:
    """The engine's checks before queueing, in `farslip segment`'s order (so a request with several
    faults gets the CLI's sentence); returns the files the job will write.

    Cheap: opens the raster (and reads the decimated sample the engine reads anyway), never the model.
    """
    import torch

    from backend.engine.checks import check_inputs, class_lines_of, output_paths
    from backend.engine.export import check_field_widths
    from backend.engine.finetuned import (model_bands_for, trained_bands, trained_resolution_said,
                                          with_trained_resolution)
    from backend.engine.models import check_model
    from backend.engine.presets import parse_class_lines

    weights = str(options.weights) if options.weights else None
    meta = _finetuned_meta(options.model, weights)
    # The resolution the job runs at, as it applies it (segment.with_model_defaults), and how it resamples.
    checked = with_trained_resolution(options, {"finetuned": meta})
    with trained_resolution_said(options.model, options, checked,
                                 "unless the request gives scale or gsd_m (--scale or --gsd)"):
        check_inputs(checked, device=torch.device(device))
    chosen_bands = trained_bands({"finetuned": meta}) if options.bands is None else None
    if chosen_bands:  # the raster has the bands the model was trained on
        model_bands_for(options.raster, chosen_bands, str(options.model))
    check_model(options.model, weights)
    classes = parse_class_lines(class_lines_of(options) or list(meta.get("class_lines") or []))
    check_field_widths(options.out, [spec.name for spec in classes])  # the run's own check (a shapefile's 254 bytes)
    if options.refine == "sam":
        from backend.engine.sam_models import sam_location

        sam_location(options.sam_model)
    return [str(path) for path in output_paths(options).values()]


def _finetuned_meta(model: str | None, weights: str | None) -> dict:
    """A fine-tuned model folder's description ({} for another model, or one check_model will refuse)."""
    from backend.engine.errors import ModelError
    from backend.engine.finetuned import read_finetuned_meta
    from backend.engine.models import locate_model

    try:
        kind, where, _ = locate_model(model, weights)
        return read_finetuned_meta(where) if kind == "finetuned" else {}
    except ModelError:
        return {}


def run_segment(request: dict, control: JobControl, models: ModelCache) -> dict:
    """Worker side of a segment job: load (or reuse) the model, run the engine, retry smaller on GPU OOM."""
    from backend.engine.checks import output_paths
    from backend.engine.feature_cache import feature_cache_for
    from backend.engine.segment import segment_raster, with_model_defaults

    options = options_from_request(request)
    from backend.service.scale_jobs import ray_address, run_segment_on_ray

    if ray_address():  # the backend's settings name a Ray cluster (or a local Ray): the job runs there
        return run_segment_on_ray(options, control, ray_address(), models.device)
    notices: list[str] = []
    control.message(f"Loading the model {options.model or options.weights or 'default'}.")
    loaded = models.get(options.model, str(options.weights) if options.weights else None, options.half)
    options = with_model_defaults(options, loaded)
    cache = feature_cache_for(options.cache_features, options.cache_mb, models.features)
    control.will_create(run_prefixes([str(path) for path in output_paths(options).values()], control.run_tag))

    def attempt(batch_size: int):
        if control.should_cancel():
            raise CancelledError("The run was cancelled; nothing was written.")
        control.message("Segmenting.")
        return segment_raster(replace(options, batch_size=batch_size), loaded, progress=control.progress,
                              should_cancel=control.should_cancel, feature_cache=cache,
                              notice=_notice(control, notices), run_tag=control.run_tag, stage=control.message,
                              inform=control.message)

    def retrying(sentence: str) -> None:  # in the log, the job's message and its result's warnings
        log.warning("%s", sentence)
        notices.append(sentence)
        control.message(sentence)
        control.restart_timing()

    assert options.batch_size is not None, "with_model_defaults chose the batch size"
    # A job's request sets batch_size and half; its device is the backend's (farslip serve --device), not the job's.
    result = retry_smaller_batches(attempt, options.batch_size, retrying, ("--batch-size", "--half"))
    features = {key: value for key, value in result.features.items() if key != "cache"}
    warnings = list(dict.fromkeys(list(result.warnings) + notices))  # a notice every attempt gave, once
    return {"outputs": dict(result.outputs), "classes": list(result.classes), "run_id": result.run_id,
            "tiles": result.tiles, "timings": dict(result.timings), "warnings": warnings,
            "quality": dict(result.report.get("quality") or {}),
            "features": features, "encoder": result.report.get("encoder")}


def _notice(control: JobControl, notices: list[str]) -> Callable[[str], None]:
    """Runtime fallbacks: in the log, the job's message and its result's warnings."""
    def notice(sentence: str) -> None:
        log.warning("%s", sentence)
        notices.append(sentence)
        control.message(sentence)

    return notice


# --------------------------------------------------------------------------- train jobs

def run_train(request: dict, control: JobControl, models: ModelCache) -> dict:
    """Worker side of a train job: training.api owns the method; the worker lends its device."""
    from training import api

    # Training changes the weights it is given and needs the memory: give it a fresh model and
    # drop the one segment jobs share (the next segment job loads it again).
    models.unload()
    request = {key: value for key, value in request.items() if value is not None}
    request.setdefault("device", models.device)
    control.message("Preparing the training data.")
    try:
        result = api.train_request(request, progress=control.progress, should_cancel=control.should_cancel,
                                   message=control.message, step_message=control.live_message)
    finally:  # the GPU memory torch's cache kept from training goes back: the next job sizes its batch from it
        release_device_memory()
    return {"outputs": dict(result.get("outputs") or {"model_dir": result.get("model_dir")}), "classes": [],
            "metrics": result.get("metrics"), "warnings": list(result.get("warnings") or [])}
