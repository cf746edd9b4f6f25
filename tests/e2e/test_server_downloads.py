"""POST /v1/models/download: the plugin's "Download" action, as a job with progress (real server)."""

from __future__ import annotations

from backend.engine.registry import known_models

MODEL = "clip-vit-b-16"


def submit_download(backend, model: str):
    return backend.client.post("/v1/models/download", json={"model": model})


def test_offline_download_fails_with_the_sentence_that_says_where_to_put_the_file(backend):
    response = submit_download(backend, MODEL)
    assert response.status_code == 202, response.text
    job = backend.wait(response.json()["job_id"])
    assert job["kind"] == "download" and job["state"] == "failed"
    assert "offline" in job["error"] and "weights directory" in job["error"]
    assert "Traceback" not in job["error"]


def test_an_unknown_model_is_refused_before_a_job_is_queued(backend):
    response = submit_download(backend, "no-such-model")
    assert response.status_code == 422
    assert "Unknown model 'no-such-model'" in response.json()["detail"]
    assert submit_download(backend, "").status_code == 422


def test_a_model_already_on_this_computer_is_done_at_once_and_listed_as_present(backend, env, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    spec = known_models()[MODEL]
    (weights / spec.weights_filename).write_bytes(b"weights")
    other = type(backend)(tmp_path / "state", dict(env, FARSLIP_WEIGHTS=str(weights)))
    try:
        job = other.wait(submit_download(other, MODEL).json()["job_id"])
        assert job["state"] == "done", job
        assert job["result"]["outputs"]["weights"] == str(weights / spec.weights_filename)
        listed = {entry["name"]: entry for entry in other.client.get("/v1/models").json()["models"]}
        assert listed[MODEL]["present"] is True
    finally:
        assert other.stop() == 0
