"""`farslip serve` with FARSLIP_RAY_ADDRESS: segment jobs run on Ray with the same result, progress and cancel."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio

from conftest import Backend

from backend.service.http_words import for_http

pytest.importorskip("ray")  # the ray extra: installed by `make setup`


@pytest.fixture(scope="module")
def ray_backend(env, tmp_path_factory):
    """A backend whose segment jobs run on a Ray it starts on this machine, two workers."""
    backend = Backend(tmp_path_factory.mktemp("ray-state"), env | {"FARSLIP_RAY_ADDRESS": "local:2"})
    yield backend
    if backend.process.poll() is None:
        assert backend.stop() == 0


def read_layer(path: str | Path) -> tuple[list[bytes], dict[str, list]]:
    meta, _fids, geometries, columns = pyogrio.raw.read(path)
    return list(geometries), {name: [None if isinstance(v, float) and v != v else v for v in values]
                              for name, values in zip(meta["fields"], columns)}


def test_a_segment_job_on_ray_reports_progress_and_writes_what_the_cli_writes(ray_backend, segment_body, out_dir,
                                                                              naip, tiny_model, farslip_cli):
    body = segment_body(class_raster=str(out_dir / "ray-classes.tif"), prob_raster=str(out_dir / "ray-probs.tif"))
    history: list[dict] = []
    job = ray_backend.wait(ray_backend.submit(body), timeout=300, history=history)
    assert job["state"] == "done", job
    progress = [h["progress"] for h in history]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert job["result"]["outputs"]["vector"] == body["out"]
    # Which runtime the chunks ran under, as a job in one process names its encoder.
    assert re.fullmatch(r"ray \((torch|openvino|onnxruntime)\): \{.*\}", job["result"]["encoder"]), job["result"]

    cli_out = out_dir / "cli.gpkg"
    classes = [arg for line in body["class_lines"] for arg in ("-c", line)]
    run = farslip_cli("segment", str(naip), *classes, "--model", str(tiny_model), "--bbox",
                      *map(str, body["bbox"]), "--out", str(cli_out), "--device", "cpu", "--quiet",
                      "--class-raster", str(out_dir / "cli-classes.tif"),
                      "--prob-raster", str(out_dir / "cli-probs.tif"))
    assert run.returncode == 0, run.stderr
    ray_geometries, ray_fields = read_layer(body["out"])
    cli_geometries, cli_fields = read_layer(cli_out)
    assert ray_geometries == cli_geometries and len(ray_geometries) > 0
    assert set(ray_fields.pop("raster")) == {naip.name}
    ray_fields.pop("run_id"), cli_fields.pop("run_id")
    assert ray_fields == cli_fields
    outputs = job["result"]["outputs"]
    assert (outputs["class_raster"], outputs["prob_raster"]) == (body["class_raster"], body["prob_raster"])
    for name in ("classes", "probs"):
        with rasterio.open(out_dir / f"ray-{name}.tif") as ray_ds, rasterio.open(out_dir / f"cli-{name}.tif") as cli_ds:
            assert ray_ds.transform == cli_ds.transform and ray_ds.crs == cli_ds.crs
            assert ray_ds.descriptions == cli_ds.descriptions
            assert np.array_equal(ray_ds.read(), cli_ds.read(), equal_nan=True)


def test_a_segment_job_on_ray_returns_the_warnings_the_cli_writes(ray_backend, segment_body, out_dir, naip, tiny_model,
                                                                   farslip_cli):
    """A job on Ray answered "warnings": [] whatever the run had to say; the dock showed nothing."""
    body = segment_body(class_lines=["water, lake"], simplify=1e6, out=str(out_dir / "ray-warned.gpkg"))
    job = ray_backend.wait(ray_backend.submit(body), timeout=300)
    assert job["state"] == "done", job
    cli_out = out_dir / "cli-warned.gpkg"
    run = farslip_cli("segment", str(naip), "-c", "water, lake", "--simplify", "1e6", "--model", str(tiny_model),
                      "--bbox", *map(str, body["bbox"]), "--out", str(cli_out), "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    said = json.loads(cli_out.with_suffix(".report.json").read_text())["warnings"]
    assert any("one class" in w.lower() for w in said) and any("--simplify" in w for w in said), said
    # The run's sentences as they are; the raster's own under its name (a run on Ray may take many rasters).
    # (said with the request's fields for the command line's flags: http_words)
    assert sorted(w.removeprefix(f"{naip.name}: ") for w in job["result"]["warnings"]) == sorted(
        for_http(w, "segment") for w in said)
    assert any(w.startswith(f'{naip.name}: "simplify": 1e+06') for w in job["result"]["warnings"])


def test_cancel_stops_the_ray_workers_and_writes_nothing(ray_backend, segment_body, out_dir):
    # 4x upsampled whole image: two work units of millions of pixels, so the cancel lands mid-chunk.
    body = segment_body(bbox=None, scale=4.0)
    job_id = ray_backend.submit(body)
    workers = Path(body["out"] + ".partial") / "workers.json"
    deadline = time.monotonic() + 300
    while not workers.exists():
        assert ray_backend.job(job_id)["state"] in ("queued", "running"), ray_backend.job(job_id)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pids = json.loads(workers.read_text())
    time.sleep(1.0)  # the workers are computing their chunks
    assert ray_backend.client.delete(f"/v1/jobs/{job_id}").status_code in (200, 202)
    job = ray_backend.wait(job_id, timeout=120)
    assert job["state"] == "cancelled", job
    assert not Path(body["out"]).exists()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a Ray worker still runs after the cancel"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
