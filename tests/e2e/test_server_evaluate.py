"""POST /v1/evaluate refuses bad paths before a job is queued (the job itself is run by tests/plugin)."""

from __future__ import annotations

from conftest import NAIP


def test_a_missing_labels_file_is_a_sentence_not_a_job(backend, tmp_path):
    response = backend.client.post("/v1/evaluate", json={
        "raster": str(NAIP.resolve()), "labels": str(tmp_path / "none.gpkg"), "class_field": "cls"})
    assert response.status_code == 400
    assert response.json()["detail"] == f"The labels file {tmp_path / 'none.gpkg'} does not exist."


def test_a_relative_path_and_an_unknown_split_are_refused(backend):
    relative = backend.client.post("/v1/evaluate", json={"raster": "naip.tif", "labels": "/l.gpkg",
                                                         "class_field": "cls"})
    assert relative.status_code == 400 and "relative" in relative.json()["detail"]
    split = backend.client.post("/v1/evaluate", json={"raster": "/x.tif", "labels": "/l.gpkg",
                                                      "class_field": "cls", "split": "train"})
    assert split.status_code == 422 and "split" in split.json()["detail"]


def test_a_blank_background_and_the_validation_split_of_a_base_model_are_refused_before_a_job(backend, tiny_model,
                                                                                              naip):
    body = {"raster": str(naip.parent / "solaris_sample_geotiff.tif"),
            "labels": str(naip.parent / "solaris_geotiff_labels.geojson"), "class_field": "building",
            "model": str(tiny_model)}
    jobs = len(backend.client.get("/v1/jobs").json()["jobs"])
    blank = backend.client.post("/v1/evaluate", json={**body, "background": "  "})
    assert blank.status_code == 400, blank.text
    assert blank.json()["detail"].startswith('"background": "  " names no class (it is blank or made only of '
                                             'separators)')
    base = backend.client.post("/v1/evaluate", json={**body, "split": "validation"})
    assert base.status_code == 400, base.text
    assert base.json()["detail"] == (f'"split": "validation" scores the held-out strip that farslip train kept '
                                     f'aside, and {tiny_model} is not a fine-tuned model folder; evaluate it with '
                                     '"split": "all" (or auto).')
    assert len(backend.client.get("/v1/jobs").json()["jobs"]) == jobs


def test_an_evaluate_job_passes_the_labels_warnings_on(backend, tiny_model, naip, tmp_path):
    """The labels' warnings (here: a feature far outside the raster) reached only the --json report; the job's
    messages and result, which the plugin shows, had none."""
    import json

    data = naip.parent
    labels = json.loads((data / "solaris_geotiff_labels.geojson").read_text())
    far = {"type": "Feature", "properties": {"building": "yes"},
           "geometry": {"type": "Polygon", "coordinates": [[[10.0, 10.0], [10.001, 10.0], [10.001, 10.001],
                                                            [10.0, 10.0]]]}}
    labels["features"].append(far)
    moved = tmp_path / "labels_and_one_far_away.geojson"
    moved.write_text(json.dumps(labels))
    response = backend.client.post("/v1/evaluate", json={
        "raster": str(data / "solaris_sample_geotiff.tif"), "labels": str(moved), "class_field": "building",
        "model": str(tiny_model), "background": "ground"})
    assert response.status_code == 202, response.text
    job = backend.wait(response.json()["job_id"], timeout=300)
    assert job["state"] == "done", job
    warnings = job["result"]["warnings"]
    assert any("outside" in warning for warning in warnings), warnings
