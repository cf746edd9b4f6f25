"""`farslip serve` jobs on a real raster with a tiny random model: progress, CLI parity, FIFO, cancel, bad input."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyogrio.raw
import pytest


def read_layer(path: str | Path) -> tuple[list[bytes], dict[str, list]]:
    """Geometries (WKB) and attribute columns of a polygon file."""
    meta, _fids, geometries, columns = pyogrio.raw.read(path)
    # NaN (e.g. a polygon without region check) compares unequal to itself: read it as None.
    return list(geometries), {name: [None if isinstance(v, float) and v != v else v for v in values]
                              for name, values in zip(meta["fields"], columns)}


def test_a_segment_job_runs_to_done_and_writes_what_the_cli_writes(backend, segment_body, out_dir, naip,
                                                                   tiny_model, farslip_cli):
    body = segment_body(class_raster=str(out_dir / "classes.tif"))
    job_id = backend.submit(body)
    history: list[dict] = []
    job = backend.wait(job_id, history=history)

    assert job["state"] == "done", job
    assert history[0]["state"] in ("queued", "running")
    assert [h["state"] for h in history if h["state"] != "done"] == sorted(
        (h["state"] for h in history if h["state"] != "done"), key=("queued", "running").index)
    progress = [h["progress"] for h in history]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert job["tiles_done"] == job["tiles_total"] > 0
    assert job["started"] and job["finished"] and job["error"] is None
    result = job["result"]
    assert result["outputs"]["vector"] == body["out"]
    assert Path(result["outputs"]["class_raster"]).is_file() and Path(result["outputs"]["report"]).is_file()
    assert {c["class"] for c in result["classes"]} == {"water", "cropland", "road"}
    assert backend.client.get("/v1/health").json()["loaded_model"] == tiny_model.stem
    # The quality estimate reaches the client as the report has it (the plugin's Review tab shows it).
    report = json.loads(Path(result["outputs"]["report"]).read_text())
    assert result["quality"] == report["quality"] and 0 <= result["quality"]["estimated_miou"] <= 1

    cli_out = out_dir / "cli.gpkg"
    bbox = [str(v) for v in body["bbox"]]
    classes = [arg for line in body["class_lines"] for arg in ("-c", line)]
    run = farslip_cli("segment", str(naip), *classes, "--model", str(tiny_model), "--bbox", *bbox,
                      "--out", str(cli_out), "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    server_geometries, server_fields = read_layer(body["out"])
    cli_geometries, cli_fields = read_layer(cli_out)
    assert server_geometries == cli_geometries
    assert len(set(server_fields.pop("run_id"))) == 1 and len(set(cli_fields.pop("run_id"))) == 1
    assert server_fields == cli_fields
    assert sum(c["polygons"] for c in result["classes"]) == len(server_geometries)


def test_models_say_which_is_loaded_by_what_it_is_not_by_its_name(backend, segment_body, tiny_model, tmp_path):
    """A local file named clip-vit-b-16.safetensors marked the registry's clip-vit-b-16 (not on this computer)
    loaded and named the polygons after it; a file of any other name was loaded with no entry saying so."""
    import shutil

    clip = tmp_path / "clip-vit-b-16.safetensors"
    shutil.copyfile(tiny_model, clip)
    for model, name in ((clip, "clip-vit-b-16.safetensors"), (tiny_model, tiny_model.stem)):
        body = segment_body(model=str(model), out=str(tmp_path / f"{model.stem}.gpkg"))
        assert backend.wait(backend.submit(body))["state"] == "done"
        answer = backend.client.get("/v1/models").json()
        assert [entry["name"] for entry in answer["models"] if entry["loaded"]] == []
        assert {key: answer["loaded"][key] for key in ("name", "kind", "path")} == \
            {"name": name, "kind": "checkpoint", "path": str(model)}
        assert backend.client.get("/v1/health").json()["loaded_model"] == name
        assert set(read_layer(body["out"])[1]["model"]) == {name}


def test_jobs_submitted_together_both_finish_in_fifo_order(backend, segment_body, out_dir):
    first = backend.submit(segment_body(out=str(out_dir / "first.gpkg")))
    second = backend.submit(segment_body(out=str(out_dir / "second.gpkg"), attention="clearclip"))
    assert backend.job(second)["state"] == "queued"
    done_second = backend.wait(second)
    done_first = backend.job(first)
    assert done_first["state"] == done_second["state"] == "done"
    assert done_first["finished"] <= done_second["started"]
    listed = [job["id"] for job in backend.client.get("/v1/jobs").json()["jobs"]]
    assert listed.index(second) < listed.index(first)  # newest first
    assert (out_dir / "first.gpkg").is_file() and (out_dir / "second.gpkg").is_file()


def test_a_second_job_writing_the_same_file_is_refused_while_the_first_is_queued(backend, segment_body):
    first = backend.submit(segment_body(scale=2.0))
    response = backend.client.post("/v1/segment", json=segment_body())
    assert response.status_code == 400
    assert first in response.json()["detail"]
    backend.client.delete(f"/v1/jobs/{first}")
    assert backend.wait(first)["state"] == "cancelled"


def test_cancel_mid_job_ends_cancelled_and_leaves_no_file(backend, segment_body, out_dir):
    # 4x upsampled whole image, one crop per batch: hundreds of batches, so the cancel lands mid-job.
    body = segment_body(bbox=None, scale=4.0, batch_size=1, class_raster=str(out_dir / "classes.tif"),
                        prob_raster=str(out_dir / "probs.tif"))
    job_id = backend.submit(body)
    running = backend.wait(job_id, until=lambda job: job["tiles_done"] >= 2 or job["state"] not in
                           ("queued", "running"))
    assert running["state"] == "running", running
    assert running["eta_s"] is not None and running["eta_s"] > 0
    cancelled_at = time.monotonic()
    response = backend.client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = backend.wait(job_id)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - cancelled_at < 10
    assert job["tiles_done"] < job["tiles_total"]
    assert list(out_dir.iterdir()) == []
    # Cancelling a finished job changes nothing.
    assert backend.client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_cancel_a_queued_job_never_runs_it(backend, segment_body, out_dir):
    blocker = backend.submit(segment_body(out=str(out_dir / "blocker.gpkg"), bbox=None, scale=2.0))
    queued = backend.submit(segment_body(out=str(out_dir / "queued.gpkg")))
    job = backend.client.delete(f"/v1/jobs/{queued}").json()
    assert job["state"] == "cancelled" and job["started"] is None
    backend.client.delete(f"/v1/jobs/{blocker}")
    backend.wait(blocker)
    assert not (out_dir / "queued.gpkg").exists()


BAD_INPUTS = {
    "missing raster": {"raster": "{data}/no-such-file.tif"},
    "corrupt raster": {"raster": "{data}/corrupt.tif"},
    "raster without georeferencing": {"raster": "{data}/float.tif"},
    "all nodata": {"raster": "{data}/all-nodata.tif", "bbox": None},
    "empty class list": {"class_lines": []},
    "bbox outside raster": {"bbox": [0.0, 0.0, 1000.0, 1000.0]},
    "unknown preset": {"class_lines": [], "preset": "no-such-preset"},
    "unknown model": {"model": "no-such-model"},
    "bad output extension": {"out": "{out}/result.xyz"},
}


def _cli_args(body: dict) -> list[str]:
    args = ["segment", body["raster"], "--out", body["out"], "--device", "cpu", "--quiet"]
    for line in body["class_lines"]:
        args += ["-c", line]
    if body.get("preset"):
        args += ["--preset", body["preset"]]
    if body.get("model"):
        args += ["--model", body["model"]]
    if body.get("bbox"):
        args += ["--bbox", *map(str, body["bbox"])]
    return args


def test_bad_inputs_get_the_same_sentence_as_the_cli(backend, segment_body, out_dir, naip):
    """The same sentence, with the command line's flags said as the request's fields (http_words)."""
    from typer.testing import CliRunner

    from backend.service.cli import app
    from backend.service.http_words import for_http

    bodies = {}
    for name, changes in BAD_INPUTS.items():
        body = segment_body(out=str(out_dir / f"{name.replace(' ', '-')}.gpkg"))
        for key, value in changes.items():
            body[key] = value.format(data=naip.parent, out=out_dir) if isinstance(value, str) else value
        bodies[name] = body
    server_messages = {}
    for name, body in bodies.items():
        response = backend.client.post("/v1/segment", json=body)
        if response.status_code == 202:  # accepted, then the job fails
            job = backend.wait(response.json()["job_id"])
            assert job["state"] == "failed", (name, job)
            server_messages[name] = job["error"]
        else:
            assert 400 <= response.status_code < 500, (name, response.text)
            server_messages[name] = response.json()["detail"]
    # `farslip segment` in this process (the same typer app as the console script, without a torch import
    # per case).
    runner = CliRunner()
    for name, body in bodies.items():
        run = runner.invoke(app, _cli_args(body))
        assert run.exit_code not in (0, 1), (name, run.output)
        assert run.stderr.strip().startswith("Error: "), (name, run.stderr)
        assert server_messages[name] == for_http(run.stderr.strip()[len("Error: "):], "segment"), name
        assert not re.search(r"(?<![\w/])--(?!workers|device)[a-z]", server_messages[name]), name
    assert sorted(p.name for p in out_dir.iterdir()) == []


@pytest.mark.parametrize("field", ["raster", "out"])
def test_relative_paths_are_refused_because_the_server_has_no_working_folder_of_the_user(backend, segment_body,
                                                                                         field):
    response = backend.client.post("/v1/segment", json=segment_body(**{field: "data/x.tif"}))
    assert response.status_code == 400
    assert "absolute path" in response.json()["detail"]


def test_an_existing_output_is_not_overwritten_unless_asked(backend, segment_body, out_dir):
    existing = out_dir / "result.gpkg"
    existing.write_bytes(b"keep me")
    response = backend.client.post("/v1/segment", json=segment_body())
    assert response.status_code == 400
    assert "already exists" in response.json()["detail"]
    assert existing.read_bytes() == b"keep me"
    job_id = backend.submit(segment_body(overwrite=True))
    assert backend.wait(job_id)["state"] == "done"
    assert existing.read_bytes() != b"keep me"
