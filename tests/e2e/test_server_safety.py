"""`farslip serve` never destroys a user's file, and keeps the HTTP contract (issue 17), on a real server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

FARSLIP = Path(sys.executable).parent / "farslip"
REPO = Path(__file__).resolve().parents[2]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_body(naip, tiny_model, out) -> dict:
    data = naip.parent
    return {"raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(data / "solaris_geotiff_labels.geojson"),
            "class_field": "building", "background": "other", "out": str(out), "base_model": str(tiny_model),
            "method": "lora", "epochs": 1, "batch_size": 2, "steps_per_epoch": 2, "distill_boxes": 1,
            "regions_per_step": 4}


def test_train_overwrite_of_a_folder_it_did_not_write_is_refused(backend, naip, tiny_model, tmp_path):
    users = tmp_path / "my-project"
    users.mkdir()
    (users / "notes.txt").write_text("the user's notes")
    response = backend.client.post("/v1/train", json={**_train_body(naip, tiny_model, users), "overwrite": True})
    assert response.status_code == 400
    assert "did not write" in response.json()["detail"]
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]


def test_a_cancelled_train_job_leaves_the_output_folder_and_files_saved_meanwhile(backend, naip, tiny_model,
                                                                                   tmp_path):
    out = tmp_path / "model"
    body = {**_train_body(naip, tiny_model, out), "epochs": 50, "steps_per_epoch": 50}
    job_id = backend.client.post("/v1/train", json=body).json()["job_id"]
    backend.wait(job_id, until=lambda job: job["state"] == "running")
    saved_meanwhile = tmp_path / "saved-during-run.txt"
    saved_meanwhile.write_text("mine")
    backend.client.delete(f"/v1/jobs/{job_id}")
    job = backend.wait(job_id, timeout=180)
    assert job["state"] == "cancelled", job
    assert saved_meanwhile.read_text() == "mine"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["saved-during-run.txt"]


def test_segment_into_an_existing_folder_named_like_a_file_is_refused(backend, segment_body, out_dir):
    folder = out_dir / "d.gpkg"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's file")
    response = backend.client.post("/v1/segment", json=segment_body(out=str(folder), overwrite=True))
    assert response.status_code == 400 and "is a folder" in response.json()["detail"]
    assert (folder / "keep.txt").read_text() == "the user's file"


def test_segment_output_equal_to_the_input_is_refused(backend, segment_body, out_dir, naip):
    raster = out_dir / "in.tif"
    shutil.copy(naip, raster)
    before = _digest(raster)
    for alias in (raster, out_dir / "x" / ".." / "in.tif"):
        (out_dir / "x").mkdir(exist_ok=True)
        response = backend.client.post("/v1/segment", json=segment_body(
            raster=str(raster), class_raster=str(alias), overwrite=True))
        assert response.status_code == 400 and "would destroy the input" in response.json()["detail"]
    assert _digest(raster) == before


def test_cancelling_a_job_leaves_another_runs_temporary_folder(backend, segment_body, out_dir):
    """A `farslip segment` writing into the same folder keeps its work folder when a server job is cancelled."""
    other = subprocess.Popen(["sleep", "120"])
    try:
        theirs = out_dir / f".farslip-{other.pid}-abcdef012345"
        theirs.mkdir()
        (theirs / "classes.tif").write_bytes(b"x" * 100)
        job_id = backend.submit(segment_body(bbox=None, scale=4.0, batch_size=1))
        backend.wait(job_id, until=lambda job: job["tiles_done"] >= 1 or job["state"] not in ("queued", "running"))
        backend.client.delete(f"/v1/jobs/{job_id}")
        assert backend.wait(job_id)["state"] == "cancelled"
        assert sorted(p.name for p in out_dir.iterdir()) == [theirs.name]
        assert (theirs / "classes.tif").stat().st_size == 100
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("field", ["raster", "out", "class_raster", "prob_raster", "weights", "model"])
def test_a_path_in_an_unknown_users_home_is_a_4xx_sentence(backend, segment_body, field):
    response = backend.client.post("/v1/segment", json=segment_body(**{field: "~nosuchuser/x.tif"}))
    assert 400 <= response.status_code < 500, response.text
    assert "no such user" in response.json()["detail"]


def test_a_fifo_as_raster_is_refused_at_once(backend, segment_body, out_dir):
    fifo = out_dir / "pipe.tif"
    os.mkfifo(fifo)
    response = backend.client.post("/v1/segment", json=segment_body(raster=str(fifo)), timeout=20)
    assert response.status_code == 400 and "named pipe" in response.json()["detail"]


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:80", "rebind.attacker.net:1234"])
def test_a_host_header_that_is_not_loopback_is_refused(backend, host):
    response = backend.client.get("/v1/health", headers={"Host": host})
    assert response.status_code == 421 and "Host header" in response.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "localhost:{port}", "127.0.0.1:{port}"])
def test_loopback_host_headers_are_served(backend, host):
    port = backend.info["port"]
    assert backend.client.get("/v1/health", headers={"Host": host.format(port=port)}).status_code == 200


@pytest.mark.parametrize("path, methods", [("/v1/jobs/0123456789abcdef0123456789abcdef", "DELETE, GET, HEAD, OPTIONS"),
                                           ("/v1/segment", "OPTIONS, POST"), ("/v1/health", "GET, HEAD, OPTIONS")])
def test_options_and_405_list_every_allowed_method(backend, path, methods):
    response = backend.client.options(path)
    assert response.status_code == 204 and response.headers["allow"] == methods
    response = backend.client.put(path, json={})
    assert response.status_code == 405 and response.headers["allow"] == methods


@pytest.mark.parametrize("path", ["/v1/health", "/v1/jobs", "/v1/models", "/v1/presets"])
def test_head_on_a_get_endpoint_answers_its_headers_without_a_body_and_needs_the_token(backend, path):
    """Monitors and scripts probe with HEAD: the GET's status and headers, no body; still behind the token."""
    got = backend.client.get(path)
    head = backend.client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert httpx.head(backend.url + path).status_code == 401


def test_head_on_an_endpoint_without_get_is_a_405(backend):
    response = backend.client.head("/v1/segment")
    assert response.status_code == 405 and response.headers["allow"] == "OPTIONS, POST"


def test_the_schema_says_paths_are_absolute_and_integers_take_whole_floats(backend, segment_body):
    schema = httpx.get(backend.url + "/openapi.json").json()["components"]["schemas"]["SegmentRequest"]["properties"]
    for field in ("raster", "out", "class_raster", "prob_raster", "weights"):
        assert "absolute path" in json.dumps(schema[field]), field
    assert schema["batch_size"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 1024}
    job_id = backend.submit(segment_body(batch_size=2.0))
    assert backend.job(job_id)["request"]["batch_size"] == 2
    assert backend.wait(job_id)["state"] == "done"
    response = backend.client.post("/v1/segment", json=segment_body(batch_size=2.5))
    assert response.status_code == 422 and "batch_size" in response.json()["detail"]


def test_a_second_server_cannot_take_over_a_running_servers_connection_file(backend, env, tmp_path):
    before = backend.connection_file.read_text()
    run = subprocess.run([str(FARSLIP), "serve", "--port", "0", "--state-dir", str(tmp_path / "other-state"),
                          "--connection-file", str(backend.connection_file)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert "belongs to a backend that is running" in run.stderr
    assert backend.connection_file.read_text() == before
    assert backend.client.get("/v1/health").status_code == 200
