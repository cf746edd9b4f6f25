"""Evaluate jobs (POST /v1/evaluate): `farslip evaluate` as a job, for the plugin's Processing algorithm.

Per-class IoU, mIoU and accuracy of a model against labelled polygons; the
measuring is training.api's, this module lends it the worker's model cache,
progress and cancel flag.
"""

from __future__ import annotations

from pathlib import Path

from backend.engine.errors import InputError


def check_evaluate_request(request: dict) -> list[str]:
    """Quick checks before queueing; returns the files the job will write."""
    for key in ("raster", "labels"):
        if not Path(request[key]).is_file():
            raise InputError(f"The {key} file {request[key]} does not exist.")
    out_json = request.get("out_json")
    if out_json and not Path(out_json).parent.is_dir():
        raise InputError(f"The folder of {out_json} does not exist; create it or choose another out_json.")
    return [out_json] if out_json else []


def run_evaluate(request: dict, control, models) -> dict:
    """Worker side: load (or reuse) the model, score it on the labels, return the metrics."""
    from training import api

    control.message(f"Loading the model {request.get('model') or 'default'}.")
    loaded = models.get(request.get("model"), None)
    control.message("Evaluating against the labelled polygons.")
    result = api.evaluate_model(
        request["raster"], request["labels"], request["class_field"], model=request.get("model"),
        background=request.get("background"), split=request.get("split") or "auto", device=models.device,
        out_json=request.get("out_json"), loaded=loaded,
        progress=lambda done, total, _info=None: control.progress(done, total),
        should_cancel=control.should_cancel)
    return {"outputs": dict(result.get("outputs") or {}), "classes": [],
            "metrics": {"split": result["split"], **result["metrics"]}}
