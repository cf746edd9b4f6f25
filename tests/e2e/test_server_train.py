"""`farslip serve` train jobs: POST /v1/train fine-tunes the tiny model; the result segments by its own classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def train_body(naip, tiny_model, out, **changes) -> dict:
    data = naip.parent
    return {"raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(data / "solaris_geotiff_labels.geojson"),
            "class_field": "building", "out": str(out), "base_model": str(tiny_model), "epochs": 1,
            "steps_per_epoch": 1, **changes}


def test_a_train_job_writes_a_model_that_a_segment_job_then_uses(backend, tiny_model, naip, tmp_path):
    data = naip.parent
    model_dir = tmp_path / "buildings-model"
    body = train_body(naip, tiny_model, model_dir, background="other", method="lora", batch_size=2, steps_per_epoch=2,
                      distill_boxes=1, regions_per_step=4)
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 202, response.text
    history: list[dict] = []
    job = backend.wait(response.json()["job_id"], timeout=300, history=history)
    assert job["state"] == "done", job
    assert job["kind"] == "train"
    assert [h["progress"] for h in history] == sorted(h["progress"] for h in history)
    assert job["result"]["outputs"]["model_dir"] == str(model_dir)
    assert job["result"]["metrics"]
    # The training's warnings reach the job result (the plugin's Train tab shows them): on this data, that its
    # 10-50 px building polygons are too small for region-category alignment, and the note of a run too short
    # to beat the base model (exactly when its best epoch is 0).
    warnings = job["result"]["warnings"]
    assert [w for w in warnings if w.startswith("Region-category alignment did not run")], warnings
    notes = ["scored above the base model" in warning for warning in warnings
             if not warning.startswith("Region-category alignment did not run")]
    assert all(notes) and len(notes) == (json.loads((model_dir / "farslip_model.json").read_text())
                                         ["training"]["best_epoch"] == 0), job["result"]["warnings"]
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
    body = train_body(naip, tiny_model, tmp_path / "m", learning_speed=3)
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 400
    assert "Unknown training option" in response.json()["detail"]


# Each option of the trainer out of its range, refused in one sentence naming it before a job is queued (these
# were accepted and then failed in the job, ran silently, or made the backend allocate ~22 GB and be killed).
REFUSED_OPTIONS = [
    ({"batch_size": 10**6}, "\"batch_size\" must be a whole number from 1 to 256 (each step holds that many crops and "
                            "their gradients in memory); got 1000000."),
    ({"eval_batch_size": 10**6}, "\"eval_batch_size\" must be a whole number from 1 to 1024"),
    ({"eval_batch_size": 0}, "\"eval_batch_size\" must be a whole number from 1 to 1024"),
    ({"lora_rank": 0}, "\"lora_rank\" must be a whole number from 1 to 256; got 0."),
    ({"lora_rank": -1}, "\"lora_rank\" must be a whole number from 1 to 256; got -1."),
    ({"lora_alpha": 1e308}, "\"lora_alpha\" must be a number above 0 and at most 1024"),
    ({"weight_decay": -1}, "\"weight_decay\" must be a number from 0 to 1; got -1.0."),
    ({"lr": 1e300}, "\"lr\" must be a number above 0 and at most 10"),
    ({"last_blocks": 0}, "\"last_blocks\" must be a whole number from 1 to 64"),
    ({"last_blocks": -1}, "\"last_blocks\" must be a whole number from 1 to 64"),
    ({"last_blocks": 99}, "\"last_blocks\" must be a whole number from 1 to 64"),
    ({"distill_boxes": -1}, "\"distill_boxes\" must be a whole number from 0 to 64"),
    ({"regions_per_step": 0}, "\"regions_per_step\" must be a whole number from 1 to 256"),
    ({"region_min_px": 500, "region_max_px": 10}, "\"region_min_px\" (500) must not exceed \"region_max_px\" (10)"),
    ({"region_min_px": -5}, "\"region_min_px\" must be a number from 1"),
    ({"warmup_steps": -5}, "\"warmup_steps\" must be a whole number from 0"),
    ({"buffer_px": -5}, "\"buffer_px\" must be a whole number from 0 to 4096"),
    ({"crop_px": 0}, "\"crop_px\" must be a whole number from 32 to 1024"),
    ({"crop_px": 7}, "\"crop_px\" must be a whole number from 32 to 1024"),
    ({"class_balance": -3}, "\"class_balance\" must be a number from 0 to 1"),
    ({"distill_weight": -1}, "\"distill_weight\" must be a number from 0 to 100"),
    ({"epochs": 50000}, "\"epochs\" must be a whole number from 1 to 10000"),
    ({"steps_per_epoch": 10**6}, "\"steps_per_epoch\" must be at least 1 and at most 100000"),
    ({"device": "tpu"}, "Unknown device 'tpu'. Use auto, cpu, cuda or mps."),
    ({"device": "cuda:7"}, "cuda"),
    ({"class_names": {"yes": ""}}, "\"class_names\" renames the label value 'yes' to '', which names no class"),
    ({"background": "  "}, "\"background\": \"  \" names no class"),
]


@pytest.mark.parametrize("changes, sentence", REFUSED_OPTIONS, ids=[str(case[0]) for case in REFUSED_OPTIONS])
def test_a_training_option_out_of_range_is_refused_before_a_job_is_queued(backend, tiny_model, naip, tmp_path,
                                                                          changes, sentence):
    jobs = len(backend.client.get("/v1/jobs").json()["jobs"])
    response = backend.client.post("/v1/train", json=train_body(naip, tiny_model, tmp_path / "m", **changes))
    assert response.status_code == 400, response.text
    assert sentence in response.json()["detail"]
    assert len(backend.client.get("/v1/jobs").json()["jobs"]) == jobs
    assert list(tmp_path.iterdir()) == []


def test_more_last_blocks_than_the_model_has_fail_the_job_in_a_sentence_before_training(backend, tiny_model, naip,
                                                                                          tmp_path):
    body = train_body(naip, tiny_model, tmp_path / "m", background="other", method="last-blocks", last_blocks=3)
    response = backend.client.post("/v1/train", json=body)
    assert response.status_code == 202, response.text
    job = backend.wait(response.json()["job_id"], timeout=300)
    assert job["state"] == "failed", job
    assert job["error"] == (f"\"last_blocks\": 3 is more than the 2 blocks of {tiny_model.stem}'s vision tower; "
                            "give at most 2 (\"method\": \"full\" trains them all).")
    assert list(tmp_path.iterdir()) == []


def test_a_train_request_without_out_writes_a_new_model_in_the_models_folder(backend, env, tiny_model, naip):
    """"out" was required (422) while `farslip train` as DESIGN.md writes it gives none: the model goes to a new
    folder in the backend's models folder, listed by GET /v1/models; a second request queued meanwhile gets -2."""
    import shutil

    body = train_body(naip, tiny_model, "unused", background="other", batch_size=2, distill_boxes=1,
                      regions_per_step=4)
    del body["out"]
    root = Path(env["FARSLIP_HOME"]) / "models"
    name = "solaris_sample_geotiff-solaris_geotiff_labels"
    # A request refused once its folder was chosen lets the name go: its claim stayed for the server's life, and
    # every `farslip train` of the same files on this computer went to NAME-2 meanwhile.
    refused = backend.client.post("/v1/train", json=body | {"class_field": "no_such_field"})
    assert refused.status_code == 400 and "no_such_field" in refused.json()["detail"], refused.text
    assert not [entry.name for entry in root.iterdir() if entry.name.startswith(f".{name}")], "no claim is left"
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:  # sent at once: each gets a folder of its own, none is refused
            jobs = list(pool.map(lambda _: backend.client.post("/v1/train", json=body), range(3)))
        assert [job.status_code for job in jobs] == [202, 202, 202], [job.text for job in jobs]
        done = [backend.wait(job.json()["job_id"], timeout=300) for job in jobs]
        assert [job["state"] for job in done] == ["done", "done", "done"], done
        folders = [str(root / name), str(root / f"{name}-2"), str(root / f"{name}-3")]
        assert sorted(job["result"]["outputs"]["model_dir"] for job in done) == folders
        assert sorted(job["request"]["out"] for job in done) == folders
        listed = {entry["name"]: entry for entry in backend.client.get("/v1/models").json()["models"]}
        assert listed[name]["kind"] == listed[f"{name}-2"]["kind"] == "finetuned"
        refused = backend.client.post("/v1/train", json=body | {"resume": True})
        assert refused.status_code == 400 and '"resume" continues the training' in refused.json()["detail"]
    finally:
        for folder in (root / name, root / f"{name}-2", root / f"{name}-3"):
            shutil.rmtree(folder, ignore_errors=True)


def _halves(raster: Path, folder: Path, **changes) -> list[str]:
    """The left and right halves of `raster` as files of their own (the right one with profile `changes`)."""
    import rasterio
    from rasterio.windows import Window

    paths = []
    with rasterio.open(raster) as ds:
        half = ds.width // 2
        for name, window, extra in (("left", Window(0, 0, half, ds.height), {}),
                                    ("right", Window(half, 0, ds.width - half, ds.height), changes)):
            profile = ds.profile | {"width": window.width, "height": window.height,
                                    "transform": ds.window_transform(window)} | extra
            with rasterio.open(folder / f"{name}.tif", "w", **profile) as out:
                out.write(ds.read(window=window))
            paths.append(str(folder / f"{name}.tif"))
    return paths


def test_a_train_job_on_a_list_of_tiles_trains_on_their_mosaic(backend, tiny_model, naip, tmp_path):
    """DESIGN.md's POST /v1/train takes "raster(s)": tiles on one pixel grid are one mosaic (a VRT the backend
    keeps, recorded in the job's request and the model); tiles in two CRSs are a 400 saying so."""
    tiles = _halves(naip.parent / "solaris_sample_geotiff.tif", tmp_path)
    model_dir = tmp_path / "tiles-model"
    response = backend.client.post("/v1/train", json=train_body(naip, tiny_model, model_dir, raster=tiles,
                                                                background="other", batch_size=2))
    assert response.status_code == 202, response.text
    job = backend.wait(response.json()["job_id"], timeout=300)
    assert job["state"] == "done", job
    mosaic = job["request"]["raster"]
    assert mosaic.endswith(".vrt") and Path(mosaic).parent.name == "mosaics"
    recorded = json.loads((model_dir / "farslip_model.json").read_text("utf-8"))
    assert recorded["data"]["raster"]["path"] == mosaic
    import rasterio

    with rasterio.open(mosaic) as mosaic_ds, rasterio.open(naip.parent / "solaris_sample_geotiff.tif") as whole:
        assert (mosaic_ds.width, mosaic_ds.height, mosaic_ds.transform) == (whole.width, whole.height,
                                                                              whole.transform)
        assert (mosaic_ds.read() == whole.read()).all()

    (tmp_path / "other").mkdir()
    other = _halves(naip.parent / "solaris_sample_geotiff.tif", tmp_path / "other", crs="EPSG:32634")
    refused = backend.client.post("/v1/train", json=train_body(naip, tiny_model, tmp_path / "m2", raster=other,
                                                               background="other"))
    assert refused.status_code == 400
    assert refused.json()["detail"].startswith(f"The rasters {other[1]} and {other[0]} are in different CRSs")
    assert not (tmp_path / "m2").exists()
