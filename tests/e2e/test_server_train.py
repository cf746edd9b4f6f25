"""`farslip serve` train jobs: POST /v1/train fine-tunes the tiny model; the result segments by its own classes."""

from __future__ import annotations

from pathlib import Path


def test_a_train_job_writes_a_model_that_a_segment_job_then_uses(backend, tiny_model, naip, tmp_path):
    data = naip.parent
    model_dir = tmp_path / "buildings-model"
    body = {"raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(data / "solaris_geotiff_labels.geojson"),
            "class_field": "building", "background": "other", "out": str(model_dir), "base_model": str(tiny_model),
            "method": "lora", "epochs": 1, "batch_size": 2, "steps_per_epoch": 2, "distill_boxes": 1,
            "regions_per_step": 4}
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 202, response.text
    history: list[dict] = []
    job = backend.wait(response.json()["job_id"], timeout=300, history=history)
    assert job["state"] == "done", job
    assert job["kind"] == "train"
    assert [h["progress"] for h in history] == sorted(h["progress"] for h in history)
    assert job["result"]["outputs"]["model_dir"] == str(model_dir)
    assert job["result"]["metrics"]
    # The training's warnings reach the job result (the plugin's Train tab shows them): this data has none.
    assert job["result"]["warnings"] == []
    assert (model_dir / "farslip_model.json").is_file()

    again = backend.client.post("/v1/train", json=body)
    assert again.status_code == 400 and "already exists" in again.json()["detail"]

    out = tmp_path / "by-trained-model.gpkg"
    segment = backend.submit({"raster": str(data / "solaris_sample_geotiff.tif"), "model": str(model_dir),
                              "bbox": None, "out": str(out)})
    done = backend.wait(segment)
    assert done["state"] == "done", done
    assert Path(done["result"]["outputs"]["vector"]) == out
    assert len(done["result"]["classes"]) >= 2  # the model's own classes (buildings + background)


def test_a_train_request_with_an_unknown_option_is_refused(backend, tiny_model, naip, tmp_path):
    data = naip.parent
    body = {"raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(data / "solaris_geotiff_labels.geojson"),
            "class_field": "building", "out": str(tmp_path / "m"), "learning_speed": 3}
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 400
    assert "Unknown training option" in response.json()["detail"]
