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
