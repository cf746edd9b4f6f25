"""`farslip serve` keeps its own files (job history, log, connection file) out of any job's reach, reloads a model
whose file was replaced, answers a wrong method and a pasted value in one short sentence, and tells after a crash
where an interrupted training's checkpoint is (a real server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import rasterio

from backend.service.jobs import JobStore
from tinymodels import make_tiny_clip, save_safetensors


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evaluate_body(naip, tiny_model, out_json) -> dict:
    data = naip.parent
    return {"raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(data / "solaris_geotiff_labels.geojson"),
            "class_field": "building", "background": "other", "model": str(tiny_model), "out_json": str(out_json),
            "overwrite": True}


def test_no_job_may_write_over_the_backends_own_files(backend, naip, tiny_model, tmp_path):
    state = backend.state_dir
    own = [state / "jobs.sqlite", backend.connection_file, state / "logs" / "backend.log"]
    before = {path: _digest(path) for path in own}
    for path in own:
        response = backend.client.post("/v1/evaluate", json=_evaluate_body(naip, tiny_model, path))
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert "would write over the backend's" in detail and "outside the backend's state folder" in detail, detail
    # A model folder written with overwrite replaces the folder: never one that holds the backend's files.
    train = {"raster": str(naip.parent / "solaris_sample_geotiff.tif"),
             "labels": str(naip.parent / "solaris_geotiff_labels.geojson"), "class_field": "building",
             "background": "other", "out": str(state), "base_model": str(tiny_model), "overwrite": True}
    response = backend.client.post("/v1/train", json=train)
    assert response.status_code == 400, response.text
    segment = {"raster": str(naip), "class_lines": ["water", "road"], "model": str(tiny_model),
               "out": str(state / "logs" / "result.gpkg")}
    response = backend.client.post("/v1/segment", json=segment)
    assert response.status_code == 400 and "log folder" in response.json()["detail"], response.text
    assert {path: _digest(path) for path in own} == before
    assert json.loads(backend.connection_file.read_text())["token"] == backend.token
    # Beside them, in the same state folder, outputs are the user's to choose.
    fine = tmp_path / "metrics.json"
    response = backend.client.post("/v1/evaluate", json=_evaluate_body(naip, tiny_model, fine))
    assert response.status_code == 202, response.text
    assert backend.wait(response.json()["job_id"], timeout=300)["state"] == "done"
    assert json.loads(fine.read_text())["metrics"]


def test_a_model_file_replaced_at_the_same_path_is_loaded_again(backend, segment_body, out_dir, tmp_path):
    model = tmp_path / "model.safetensors"
    save_safetensors(make_tiny_clip(seed=0), model)
    first = backend.submit(segment_body(model=str(model), out=str(out_dir / "a.gpkg"),
                                        class_raster=str(out_dir / "a.tif")))
    assert backend.wait(first)["state"] == "done"
    save_safetensors(make_tiny_clip(seed=1), tmp_path / "other.safetensors")
    shutil.copyfile(tmp_path / "other.safetensors", model)  # new weights under the old name
    second = backend.submit(segment_body(model=str(model), out=str(out_dir / "b.gpkg"),
                                         class_raster=str(out_dir / "b.tif")))
    assert backend.wait(second)["state"] == "done"
    reports = [json.loads((out_dir / f"{name}.report.json").read_text()) for name in "ab"]
    assert reports[1]["weights_sha256"] == _digest(model) != reports[0]["weights_sha256"]
    with rasterio.open(out_dir / "a.tif") as a, rasterio.open(out_dir / "b.tif") as b:
        assert (a.read() != b.read()).any()


def test_a_wrong_method_and_a_pasted_value_get_short_sentences(backend, naip):
    response = backend.client.get("/v1/segment")
    assert response.status_code == 405 and response.headers["allow"] == "OPTIONS, POST"
    assert response.json()["detail"] == "'/v1/segment' does not take GET; it takes POST."
    response = backend.client.post("/v1/index", json={"raster": str(naip), "bbox": [0, 0, 1, 1],
                                                      "bbox_crs": "X" * 10000})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert len(detail) < 500 and "is not a CRS I know" in detail, detail
    response = backend.client.post("/v1/segment", json={"raster": "/data/a.tif", "class_lines": ["water"],
                                                        "out": "/tmp/" + "a/" * 2000 + "x.gpkg"})
    assert response.status_code == 400, response.text
    assert len(response.json()["detail"]) < 600, response.json()["detail"]


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpoint kept", "nothing to resume"])
def test_a_training_the_backend_died_in_says_where_its_checkpoint_is(tmp_path, checkpoint):
    out = tmp_path / "my-model"
    work = tmp_path / ".my-model.partial"
    (work / "checkpoint").mkdir(parents=True)
    (work / "owner.json").write_text(json.dumps({"pid": 2**22 + 12345}))  # a process that is gone
    if checkpoint:
        (work / "checkpoint" / "state.pt").write_bytes(b"state")
    store = JobStore(tmp_path / "jobs.sqlite")
    job = {"id": "0123456789abcdef", "kind": "train", "state": "queued", "progress": 0.0, "tiles_done": 0,
           "tiles_total": 0, "eta_s": None, "message": "", "created": "2026-12-06T00:00:00Z", "started": None,
           "finished": None, "request": {"out": str(out)}, "result": None, "error": None}
    store.insert(job, [str(out)])
    store.update({**job, "state": "running"})
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite")
    [interrupted] = reopened.mark_interrupted()
    message = interrupted["message"]
    if checkpoint:
        assert str(work) in message and "resume" in message and "nothing was written" not in message, message
        assert (work / "checkpoint" / "state.pt").is_file()
    else:
        assert "nothing was written" in message, message
        assert not work.exists()
    assert not out.exists()
    reopened.close()
