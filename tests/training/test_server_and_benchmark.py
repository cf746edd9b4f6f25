"""The server's job entry point, the benchmark-folder mode and the area-of-interest background."""

from __future__ import annotations

import pytest
import shapely
from training_data import RASTER_CRS, write_labels, write_two_image_benchmark

from backend.engine.errors import InputError
from backend.engine.models import load_model
from training.api import check_request, evaluate_model, train_request
from training.evaluate import benchmark_metrics


def test_train_request_runs_a_job_with_two_argument_progress(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    request = {"raster": str(raster), "labels": str(labels), "class_field": "cls", "out": str(tmp_path / "job"),
               "base_model": str(tiny_model), "method": "lora", "epochs": 1, "lr": 1e-3, "batch_size": 2,
               "steps_per_epoch": 2, "distill_boxes": 1, "regions_per_step": 4, "background": None}
    assert check_request(request) == [str(tmp_path / "job")]
    steps, messages = [], []
    result = train_request(request, progress=lambda done, total: steps.append((done, total)),
                           message=messages.append)
    assert steps[-1][0] == steps[-1][1] == 2
    assert any("validation mIoU" in m for m in messages)
    assert result["outputs"]["model_dir"] == str(tmp_path / "job")
    assert result["metrics"]["after"]["miou"] is not None
    with pytest.raises(InputError, match="already exists"):
        check_request(request)
    with pytest.raises(InputError, match="Unknown training option"):
        check_request({**request, "out": str(tmp_path / "other"), "learning_speed": 3})


def test_benchmark_folder_mode_scores_image_label_pairs(tiny_model, tmp_path):
    write_two_image_benchmark(tmp_path, ignored_rows=8)
    loaded = load_model(str(tiny_model))
    metrics = benchmark_metrics(tmp_path, ["dark", "bright"], loaded)
    assert metrics["images"] == 2
    assert metrics["pixels"] == 2 * 88 * 128
    # Below the probability threshold every pixel gets the background class: here class 1 ("bright").
    unsure = benchmark_metrics(tmp_path, ["dark", "bright"], loaded, prob_threshold=1.01, background_index=1)
    assert unsure["confusion"][0][0] == 0 and unsure["confusion"][1][0] == 0
    with pytest.raises(InputError, match="background index"):
        benchmark_metrics(tmp_path, ["dark", "bright"], loaded, background_index=2)
    with pytest.raises(InputError, match="No image/label pairs"):
        benchmark_metrics(tmp_path / "img_dir", ["a", "b"], loaded)


def test_aoi_limits_the_background_class(synthetic, tiny_model, tmp_path):
    raster, _, _ = synthetic
    houses = [shapely.box(500050, 4999500, 500100, 4999550), shapely.box(500400, 4999800, 500450, 4999850)]
    labels = write_labels(tmp_path / "houses.gpkg", houses, ["house", "house"], RASTER_CRS)
    aoi = write_labels(tmp_path / "aoi.gpkg", [shapely.box(500000, 4999400, 500500, 4999900)], ["x"],
                       RASTER_CRS)
    plain = evaluate_model(raster, labels, "cls", model=str(tiny_model), background="other")
    wider = evaluate_model(raster, labels, "cls", model=str(tiny_model), background="other", aoi=aoi)
    assert wider["metrics"]["pixels"] > plain["metrics"]["pixels"]
    assert wider["metrics"]["pixels"] == 250 * 250
