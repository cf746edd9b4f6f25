"""Evaluate jobs (POST /v1/evaluate): `farslip evaluate` as a job, for the plugin's Processing algorithm.

Per-class IoU, mIoU and accuracy of a model against labelled polygons; the
measuring is training.api's, this module lends it the worker's model cache,
progress and cancel flag.
"""

from __future__ import annotations



def check_labels(labels: str, class_field: str) -> None:
    """The labels are a vector source the job can read and its layer has `class_field` (training.labels'
    own check: the layer list and the field names, no features)."""
    from training.labels import label_layer

    label_layer(labels, class_field, option="class_field")


def check_evaluate_request(request: dict) -> list[str]:
    """Quick checks before queueing (the raster, the labels and their class field, the model, the output);
    returns the files the job will write."""
    from backend.engine.files import check_raster_name, raster_name
    from backend.engine.models import check_model, locate_model
    from training.api import check_evaluation
    from training.labels import check_two_classes

    raster = check_raster_name(raster_name(request["raster"]))  # a subdataset's file is there
    check_labels(request["labels"], request["class_field"])
    model = request.get("model")
    check_model(model, None)
    check_evaluation(model, None, request.get("background"), None, request.get("split") or "auto")
    outputs = _check_out_json(request, raster, model)
    if locate_model(model, None)[0] != "finetuned":  # a fine-tuned model brings its own classes
        check_two_classes(request["labels"], request["class_field"], request.get("background"))
    return outputs


def _check_out_json(request: dict, raster: str, model: str | None) -> list[str]:
    """The metrics file, if one is asked for: a file the run may write (not one of its inputs)."""
    from backend.engine.files import check_output_file, input_paths, raster_file
    from backend.service.server.security import looks_like_path
    from training.labels import vector_file

    out_json = request.get("out_json")
    if not out_json:
        return []

    model_file = model if model and looks_like_path(model) else None
    inputs = input_paths([("raster", raster_file(raster)), ("labels", str(vector_file(request["labels"]))),
                          ("model", model_file)])
    check_output_file(out_json, "out_json", inputs, bool(request.get("overwrite")), option='"overwrite": true',
                      gdal=False)
    return [out_json]


def run_evaluate(request: dict, control, models) -> dict:
    """Worker side: load (or reuse) the model, score it on the labels, return the metrics."""
    from backend.engine.files import raster_name
    from training import api

    control.message(f"Loading the model {request.get('model') or 'default'}.")
    loaded = models.get(request.get("model"), None)
    control.message("Evaluating against the labelled polygons.")
    result = api.evaluate_model(
        raster_name(request["raster"]), request["labels"], request["class_field"], model=request.get("model"),
        background=request.get("background"), split=request.get("split") or "auto", device=models.device,
        out_json=request.get("out_json"), loaded=loaded,
        progress=lambda done, total, _info=None: control.progress(done, total),
        should_cancel=control.should_cancel,
        # A batch that ran out of GPU memory, retried at half the size: the job's message as it happens (and
        # among the result's warnings); an evaluate request has no option the last sentence could name.
        notice=control.message, flags=())
    warnings = [str(warning) for warning in result.get("warnings") or []]
    for warning in warnings:  # as the CLI prints them: the labels' gaps, the pixels left out
        control.message(f"Warning: {warning}")
    return {"outputs": dict(result.get("outputs") or {}), "classes": [], "warnings": warnings,
            "metrics": {"split": result["split"], **result["metrics"]}}
