"""POST /v1/models/download: the plugin's "Download" action, as a job with progress (real server)."""

from __future__ import annotations

import pytest

from backend.engine.registry import known_models
from backend.engine.sam_models import known_sam_models

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


def test_an_unknown_model_sentence_names_what_can_be_downloaded(backend):
    """Not the engine's sentence for `segment --model`: a checkpoint path is not something to download."""
    detail = submit_download(backend, "/tmp/x.pt").json()["detail"]
    assert detail.startswith("Unknown model '/tmp/x.pt': the models that can be downloaded are ")
    assert MODEL in detail and "sam-vit-b" in detail and "path" not in detail


@pytest.mark.parametrize("name, specs, listing", [(MODEL, known_models, "models"),
                                                  ("sam-vit-b", known_sam_models, "sam_models")])
def test_a_model_already_on_this_computer_is_done_at_once_and_listed_as_present(name, specs, listing, backend, env,
                                                                               tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    spec = specs()[name]
    (weights / spec.weights_filename).write_bytes(b"weights")
    other = type(backend)(tmp_path / "state", dict(env, FARSLIP_WEIGHTS=str(weights)))
    try:
        job = other.wait(submit_download(other, name).json()["job_id"])
        assert job["state"] == "done", job
        assert job["result"]["outputs"]["weights"] == str(weights / spec.weights_filename)
        listed = {entry["name"]: entry for entry in other.client.get("/v1/models").json()[listing]}
        assert listed[name]["present"] is True
    finally:
        assert other.stop() == 0


def test_the_model_list_says_where_missing_weights_come_from_and_go(backend):
    """The plugin's tooltip for missing SAM weights reads hf_file, hf_repo and expected_path: the response
    model dropped them, and the tooltip said "put  from  at "."""
    listed = backend.client.get("/v1/models").json()
    sam = {entry["name"]: entry for entry in listed["sam_models"]}["sam-vit-b"]
    spec = known_sam_models()["sam-vit-b"]
    assert (sam["hf_repo"], sam["hf_file"]) == (spec.hf_repo, spec.hf_file)
    assert sam["expected_path"].endswith("/" + spec.weights_filename)
    registry = {entry["name"]: entry for entry in listed["models"]}[MODEL]
    assert (registry["hf_repo"], registry["hf_file"]) == (known_models()[MODEL].hf_repo, known_models()[MODEL].hf_file)
    assert registry["expected_path"].endswith("/" + known_models()[MODEL].weights_filename)


def test_an_offline_sam_download_names_the_segment_field_that_takes_a_sam_file(backend):
    """Not "pass --weights PATH": a SAM file is given as a segment request's sam_model."""
    job = backend.wait(submit_download(backend, "sam-vit-b").json()["job_id"])
    assert job["state"] == "failed" and "offline" in job["error"]
    assert '"sam_model": PATH' in job["error"] and "weights\": PATH" not in job["error"]
    assert "--" not in job["error"]
