"""POST /v1/index, /v1/search and /v1/evaluate take a raster named in GDAL's syntax as /v1/segment does (a real
backend process): a netCDF variable (NETCDF:"/abs/a.nc":var) and a zipped GeoTIFF (/vsizip//abs/a.zip/x.tif).

They were refused (evaluate: 'relative'), or lost the slash that makes the archive absolute on the way to GDAL
(index, search: a pathlib.Path), or were recorded as <working folder>/NETCDF:... in the search report."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import rasterio.shutil

from conftest import NAIP


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> dict[str, Path]:
    """NAIP as a netCDF variable, and zipped; the labelled solaris GeoTIFF zipped too."""
    folder = tmp_path_factory.mktemp("gdal-names")
    nc = folder / "naip.nc"
    rasterio.shutil.copy(NAIP, nc, driver="netCDF", FORMAT="NC4")
    with zipfile.ZipFile(folder / "naip.zip", "w") as archive:
        archive.write(NAIP, "naip.tif")
    with zipfile.ZipFile(folder / "solaris.zip", "w") as archive:
        archive.write(NAIP.parent / "solaris_sample_geotiff.tif", "sub/solaris.tif")
    return {"netcdf": f'NETCDF:"{nc}":Band2', "zip": f"/vsizip/{folder / 'naip.zip'}/naip.tif",
            "labelled zip": f"/vsizip/{folder / 'solaris.zip'}/sub/solaris.tif"}


def submit(backend, path: str, body: dict) -> dict:
    response = backend.client.post(path, json=body)
    assert response.status_code == 202, response.text
    return backend.wait(response.json()["job_id"])


@pytest.mark.parametrize("kind", ["netcdf", "zip"])
def test_index_and_search_run_on_a_gdal_name(backend, names, kind, tiny_model, out_dir, small_bbox):
    name = names[kind]
    assert name.startswith(("NETCDF:", "/vsizip//"))
    index = submit(backend, "/v1/index", {"raster": name, "bbox": small_bbox, "model": str(tiny_model)})
    assert index["state"] == "done", index
    assert index["result"]["index"]["computed"] > 0
    out = out_dir / "hits.gpkg"
    search = submit(backend, "/v1/search", {"raster": name, "sentences": ["a lake"], "bbox": small_bbox,
                                             "model": str(tiny_model), "top": 2, "out": str(out)})
    assert search["state"] == "done", search
    assert search["result"]["index"]["computed"] == 0  # the index built above, found again by the name
    assert json.loads(out.with_suffix(".report.json").read_text())["raster"] == name


def test_evaluate_runs_on_a_gdal_name_and_a_relative_subdataset_is_refused(backend, names, tiny_model, out_dir):
    labels = NAIP.parent / "solaris_geotiff_labels.geojson"
    body = {"raster": names["labelled zip"], "labels": str(labels), "class_field": "building",
            "model": str(tiny_model), "background": "ground", "split": "all",
            "out_json": str(out_dir / "metrics.json")}
    job = submit(backend, "/v1/evaluate", body)
    assert job["state"] == "done", (job["message"], job.get("error"))
    assert json.loads((out_dir / "metrics.json").read_text())["raster"] == names["labelled zip"]
    relative = backend.client.post("/v1/evaluate", json={**body, "raster": 'NETCDF:"naip.nc":Band2'})
    assert relative.status_code == 400, relative.text
    assert relative.json()["detail"].startswith("The raster 'NETCDF:\"naip.nc\":Band2' names the file 'naip.nc', "
                                                "which is relative")
