"""POST /v1/train takes a raster named in GDAL's syntax as /v1/segment does (a real backend process): a
GeoPackage raster table (GPKG:/abs/a.gpkg:t1) and a zipped GeoTIFF (/vsizip//abs/a.zip/x.tif). The trainer's own
check refused both as 'does not exist' (a regular-file check on the name).

A relative /vsizip/a.zip/x.tif was taken as typed and read in whatever folder the backend was started from; it is
refused as a relative path is."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from training_data import copy_as_gpkg_table

from conftest import NAIP, REPO

DATA = NAIP.parent
LABELS = DATA / "solaris_geotiff_labels.geojson"


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict[str, str]:
    """The labelled solaris GeoTIFF as a GeoPackage raster table and zipped."""
    folder = tmp_path_factory.mktemp("train-gdal-names")
    source = DATA / "solaris_sample_geotiff.tif"
    copy_as_gpkg_table(source, folder / "a.gpkg")
    with zipfile.ZipFile(folder / "a.zip", "w") as archive:
        archive.write(source, "sub/solaris.tif")
    return {"gpkg": f"GPKG:{folder / 'a.gpkg'}:t1", "zip": f"/vsizip/{folder / 'a.zip'}/sub/solaris.tif",
            "relative zip": f"/vsizip/{os.path.relpath(folder / 'a.zip', REPO)}/sub/solaris.tif"}


def body(raster: str, tiny_model: Path, out: Path) -> dict:
    return {"raster": raster, "labels": str(LABELS), "class_field": "building", "background": "other",
            "out": str(out), "base_model": str(tiny_model), "method": "lora", "epochs": 1, "batch_size": 2,
            "steps_per_epoch": 1, "distill_boxes": 1, "regions_per_step": 4}


@pytest.mark.parametrize("kind", ["gpkg", "zip"])
def test_a_train_job_runs_on_a_gdal_name(backend, names, kind, tiny_model, tmp_path):
    out = tmp_path / "model"
    response = backend.client.post("/v1/train", json=body(names[kind], tiny_model, out))
    assert response.status_code == 202, response.text
    job = backend.wait(response.json()["job_id"], timeout=300)
    assert job["state"] == "done", (job["message"], job.get("error"))
    assert json.loads((out / "farslip_model.json").read_text())["data"]["raster"]["path"] == names[kind]


def test_a_relative_archive_is_refused(backend, names, tiny_model, tmp_path):
    relative = names["relative zip"]
    assert not relative.startswith("/vsizip//")
    assert (REPO / relative.removeprefix("/vsizip/").removesuffix("/sub/solaris.tif")).is_file()
    for path, request in (("/v1/train", body(relative, tiny_model, tmp_path / "model")),
                          ("/v1/evaluate", {"raster": relative, "labels": str(LABELS), "class_field": "building",
                                            "model": str(tiny_model)})):
        response = backend.client.post(path, json=request)
        assert response.status_code == 400, (path, response.text)
        assert "which is relative" in response.json()["detail"], response.text
    assert not (tmp_path / "model").exists()
