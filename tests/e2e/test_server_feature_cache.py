"""The server keeps image features between jobs: new classes on the same extent skip the encoder."""

from __future__ import annotations

import pyogrio.raw


def test_a_second_job_with_new_classes_reuses_the_features_and_matches_an_uncached_cli_run(
        backend, segment_body, out_dir, naip, tiny_model, farslip_cli):
    first = backend.wait(backend.submit(segment_body(out=str(out_dir / "first.gpkg"))))
    assert first["state"] == "done", first
    new_classes = ["forest, trees", "building", "shed"]
    second = backend.wait(backend.submit(segment_body(out=str(out_dir / "second.gpkg"), class_lines=new_classes)))
    assert second["state"] == "done", second
    features = second["result"]["features"]
    assert features == {"cached": second["result"]["tiles"], "encoded": 0}

    health = backend.client.get("/v1/health").json()["feature_cache"]
    assert 0 < health["memory_bytes"] <= health["memory_max_bytes"]
    assert health["entries"] >= second["result"]["tiles"] and health["hits"] >= second["result"]["tiles"]

    classes = [arg for line in new_classes for arg in ("-c", line)]
    bbox = [str(v) for v in segment_body()["bbox"]]
    run = farslip_cli("segment", str(naip), *classes, "--model", str(tiny_model), "--bbox", *bbox,
                      "--out", str(out_dir / "cli.gpkg"), "--device", "cpu", "--quiet")
    assert run.returncode == 0, run.stderr
    server = pyogrio.raw.read(out_dir / "second.gpkg")
    cli = pyogrio.raw.read(out_dir / "cli.gpkg")
    assert list(server[2]) == list(cli[2])  # the same polygons, vertex for vertex


def test_an_unknown_runtime_is_refused_with_the_valid_choices(backend, segment_body):
    response = backend.client.post("/v1/segment", json=segment_body(runtime="tensorrt"))
    assert response.status_code == 422
    assert "runtime" in response.json()["detail"]
