"""Every segment option reaches the engine through POST /v1/segment on a real server (127.0.0.1): a run
with a non-default value for each option that runs here, a refusal naming the others (no GPU for
half, no SAM weights, ...). The same run as a command line records the same options."""

from __future__ import annotations

import json

import numpy as np
import rasterio
from typer.testing import CliRunner

from backend.engine.options import option_fields
from backend.service.cli import app

# Options whose value this machine cannot run (or that a run would need weights for): the request
# is refused with a sentence that shows the engine read the option.
REFUSED = {
    "half": ({"half": True}, "needs a CUDA GPU"),
    "scale": ({"scale": 1.0, "gsd_m": 5.0}, 'either "scale" or "gsd_m"'),
    "preset": ({"preset": "no-such-preset"}, "no class preset called 'no-such-preset'"),
    "model": ({"model": "no-such-model"}, "no-such-model"),
    "sam_model": ({"refine": "sam", "sam_model": "/nonexistent/sam"},
                  "SAM model file or folder /nonexistent/sam does not exist"),
    "quality_calibration": ({"quality_calibration": "/nonexistent/q.json"},
                            "quality calibration file /nonexistent/q.json does not exist"),
}


def run_options(naip, tiny_model, bbox, folder) -> dict:
    """A request that changes every option this machine can run (all but REFUSED) from its default."""
    (folder / "classes.txt").write_text("cropland\n")
    return {
        "raster": str(naip), "class_lines": ["water, lake", "road"], "classes_file": str(folder / "classes.txt"),
        "out": str(folder / "run.gpkg"), "format": "GeoPackage", "class_raster": str(folder / "classes.tif"),
        "prob_raster": str(folder / "probs.tif"), "prob_dtype": "uint8", "overwrite": True, "weights": str(tiny_model),
        "bbox": bbox, "bbox_crs": "EPSG:26914", "bands": [3, 2, 1], "threshold": 0.05,
        "attention": "clearclip", "batch_size": 3, "gsd_m": 5.0, "min_area": 25.0, "simplify": 1.0,
        "value_range": [0.0, 250.0], "refine": "edges", "runtime": "torch", "language": "en",
        "region_checks": False, "cache_features": True, "cache_mb": 64,
    }


def test_every_option_reaches_the_engine_through_the_api_and_the_command_line(
        backend, segment_body, naip, tiny_model, small_bbox, out_dir, tmp_path):
    run = run_options(naip, tiny_model, small_bbox, out_dir)
    assert set(run) | set(REFUSED) == {item.name for item in option_fields()}
    (out_dir / "run.gpkg").write_text("replaced because overwrite is true")

    job = backend.wait(backend.submit(run))
    assert job["state"] == "done", job
    report = json.loads((out_dir / "run.report.json").read_text())
    assert report["options"] == {
        "bbox": small_bbox, "bbox_crs": "EPSG:26914", "bands": [3, 2, 1], "threshold": 0.05, "attention": "clearclip",
        "batch_size": 3, "scale": None, "gsd_m": 5.0, "min_area": 25.0, "simplify": 1.0, "value_range": [0.0, 250.0],
        "refine": "edges", "sam_model": None, "runtime": "torch", "language": "en", "quality_calibration": None}
    assert [entry["class"] for entry in report["classes"]] == ["water", "road", "cropland"]
    assert report["raster"] == str(naip) and report["model"] == tiny_model.stem
    assert set(report["outputs"]) == {"vector", "report", "coarse_vector", "class_raster", "prob_raster"}
    assert all((out_dir / name).is_file() for name in ("run.gpkg", "run_coarse.gpkg", "classes.tif", "probs.tif"))
    assert report["features"]["cache"]["disk_max_bytes"] == 64 * 2**20
    assert report["quality"]["region_checks"] == 0  # region_checks false
    assert list((backend.state_dir / "features").glob("*/*.npy")), "cache_features kept nothing on disk"

    for name, (changes, phrase) in REFUSED.items():
        response = backend.client.post("/v1/segment", json=segment_body(**changes))
        assert 400 <= response.status_code < 500 and phrase in response.json()["detail"], (name, response.text)

    cli = {**run, "out": str(tmp_path / "cli.gpkg"), "class_raster": str(tmp_path / "c.tif"),
           "prob_raster": str(tmp_path / "p.tif")}
    args = [str(naip), "-c", "water, lake", "-c", "road", "--classes-file", cli["classes_file"], "--out", cli["out"],
            "--format", "geopackage",
            "--class-raster", cli["class_raster"], "--prob-raster", cli["prob_raster"], "--prob-dtype", "uint8",
            "--overwrite",
            "--weights", str(tiny_model), "--bbox", *map(str, small_bbox), "--bbox-crs", "EPSG:26914",
            "--bands", "3,2,1", "--threshold", "0.05", "--attention", "clearclip", "--batch-size", "3",
            "--gsd", "5", "--min-area", "25", "--simplify", "1", "--value-range", "0", "250", "--refine", "edges",
            "--runtime", "torch", "--language", "en", "--cache-features", "--cache-mb", "64", "--no-region-checks",
            "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, ["segment", *args])
    assert result.exit_code == 0, result.output
    cli_report = json.loads((tmp_path / "cli.report.json").read_text())
    assert cli_report["options"] == report["options"] and cli_report["quality"]["region_checks"] == 0
    assert cli_report["classes"] == report["classes"] and cli_report["class_stats"] == report["class_stats"]
    with rasterio.open(out_dir / "probs.tif") as served, rasterio.open(tmp_path / "p.tif") as typed:
        assert served.dtypes == typed.dtypes == ("uint8",) * 3 and served.nodata == typed.nodata == 255
        assert np.array_equal(served.read(), typed.read())
