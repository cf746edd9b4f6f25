"""A run on Ray takes the segment options through one conversion; what it cannot do yet is refused in one
sentence (exit 2) before Ray starts or a file is written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from backend.engine.options import SegmentOptions
from backend.scale.run import TEXT_OPTIONS, ScaleRequest
from backend.service.cli import app


def random_rgb(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A random uint8 RGB GeoTIFF (UTM, 10 m pixels)."""
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(np.random.default_rng(seed).integers(0, 255, (3, height, width), dtype=np.uint8))
    return path


def scaled_cli_run(raster: Path, model: Path, out: Path, cache: Path, *extra: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`farslip segment RASTER --workers 1` in a process of its own, so that its Ray workers take `cache`."""
    command = [sys.executable, "-m", "backend.service.cli", "segment", str(raster), "-c", "water", "-c", "tree",
               "--model", str(model), "--out", str(out), "--workers", "1", *extra, "--quiet"]
    return subprocess.run(command, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"FARSLIP_CACHE": str(cache)} | (env or {}))


def test_every_segment_option_a_scaled_run_shares_comes_from_the_options():
    options = SegmentOptions(raster=Path("/d/in.tif"), out=Path("/d/out.gpkg"), class_raster=Path("/d/c.vrt"),
                             prob_raster=Path("/d/p.vrt"), overwrite=True, min_area=12.0, simplify=0.5,
                             quality_calibration=Path("/d/q.json"), bbox=(1.0, 2.0, 3.0, 4.0), bbox_crs="EPSG:4326",
                             refine="sam", sam_model="sam-vit-b")
    request = ScaleRequest.from_options(options, workers=3, cluster="ray://head:10001", restart=True)
    shared = [item.name for item in dataclasses.fields(ScaleRequest) if hasattr(options, item.name)]
    assert len(shared) >= 11
    for name in shared:
        value = getattr(options, name)
        assert getattr(request, name) == (str(value) if name in TEXT_OPTIONS else value), name
    assert (request.workers, request.cluster, request.restart, request.out_crs) == (3, "ray://head:10001", True, None)


@pytest.mark.parametrize("flag, named", [("--cache-features", "--cache-features"),
                                         ("--no-region-checks", "--no-region-checks")])
def test_an_option_ray_does_not_offer_yet_is_refused_before_ray_starts(shared_data, tiny_model, tmp_path, flag,
                                                                       named):
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"),
                                      str(shared_data / "naip_2020_5m.tif"), "-c", "water", "--weights",
                                      str(tiny_model), "--out", str(out), "--workers", "2", flag])
    assert result.exit_code == 2, result.output
    assert named in result.output and "not available yet in runs on Ray (several inputs" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_an_unknown_out_crs_is_refused_before_the_model_loads(shared_data, tiny_model, tmp_path, monkeypatch):
    from backend.scale import run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out-crs was checked")

    monkeypatch.setattr(run, "load_segmenter", no_model)
    out = tmp_path / "out.gpkg"
    result = CliRunner().invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"), "-c", "water", "--weights",
                                      str(tiny_model), "--out", str(out), "--workers", "1", "--out-crs", "EPSG:99999"])
    assert result.exit_code == 2, result.output
    assert "--out-crs 'EPSG:99999' is not a CRS I know" in result.output
    assert "Traceback" not in result.output and "PROJ" not in result.output
    assert not list(tmp_path.iterdir())
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize("asked, reported", [(None, False), ("1", True), ("0", False)])
def test_ray_reports_no_usage_statistics_unless_the_user_turned_them_on(monkeypatch, asked, reported):
    """Ray sends usage statistics from a cluster ray.init starts unless told not to; a farslip run on
    Ray leaves them off, and keeps the user's own RAY_USAGE_STATS_ENABLED choice."""
    from ray._common.usage import usage_lib

    from backend.scale.run import import_ray

    if asked is None:
        # set, then removed: monkeypatch records the original and restores it, whatever import_ray sets
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "")
        monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    else:
        monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", asked)
    import_ray()
    assert usage_lib.usage_stats_enabled() is reported


def test_a_raster_smaller_than_the_model_input_exports_no_runtime_on_the_workers(tiny_model, tmp_path):
    """As `segment` alone does: every crop of a raster under 224 px on a side runs under torch, so a worker has
    nothing to export (it exported the model for --runtime openvino and then never used it). A process of its
    own, so that its Ray workers take this test's cache folder."""
    cache = tmp_path / "cache"
    done = scaled_cli_run(random_rgb(tmp_path / "small.tif", 300, 150), tiny_model, tmp_path / "o.gpkg", cache,
                          "--runtime", "openvino")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "o.gpkg").is_file() and cache.is_dir()
    assert not (cache / "encoders").exists(), sorted(p.name for p in (cache / "encoders").iterdir())
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["encoders"] == report["rasters"][0]["encoders"] == ["torch"], report


@pytest.mark.parametrize("change, words", [
    ({"coef": [1, 2]}, "'coef' must be 5 finite numbers"),
    ({"class_lines": ["road", "forest"]}, "was made for the classes road; forest, not water; road"),
    ({"weights_sha256": "0" * 64}, "was made for another model"),
])
def test_a_calibration_the_run_cannot_use_is_refused_before_any_chunk_runs(change, words, tiny_model, tmp_path):
    """As `segment` alone refuses it: it was loaded after every chunk had run, and failed with a traceback."""
    from backend.engine.quality import QualityModel

    data = json.loads(QualityModel().save(tmp_path / "base.json").read_text(encoding="utf-8"))
    (tmp_path / "q.json").write_text(json.dumps(data | change), encoding="utf-8")
    raster = random_rgb(tmp_path / "in.tif", 300, 300, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "road", "--model", str(tiny_model),
                                      "--out", str(out / "r.gpkg"), "--workers", "1",
                                      "--quality-calibration", str(tmp_path / "q.json")])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert "chunks" not in result.output  # the progress of chunks never began
    assert list(out.iterdir()) == []


def test_sam_weights_that_do_not_fit_are_refused_before_ray_starts(shared_data, tiny_model, tmp_path):
    """As in a single run: the sentence (exit 3) before Ray starts or a chunk runs, not after the dense pass."""
    from tinymodels import save_tiny_sam

    sam = save_tiny_sam(tmp_path / "sam")
    (tmp_path / "lone").mkdir()
    lone = tmp_path / "lone" / "lone.safetensors"
    lone.write_bytes((sam / "model.safetensors").read_bytes())  # read as ViT-B, which it is not
    out = tmp_path / "out" / "out.gpkg"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"),
                                      str(shared_data / "naip_2020_5m.tif"), "-c", "water", "-c", "road", "--weights",
                                      str(tiny_model), "--out", str(out), "--workers", "2", "--refine", "sam",
                                      "--sam-model", str(lone)])
    assert result.exit_code == 3, result.output
    assert "do not fit the SAM configuration" in result.output and "Traceback" not in result.output
    assert list(out.parent.iterdir()) == []
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    # The check every run on Ray passes (a server's jobs on FARSLIP_RAY_ADDRESS too), not only the CLI's.
    from backend.engine.errors import ModelError
    from backend.scale.run import check_scale_options

    options = SegmentOptions(raster=shared_data / "naip_2020_5m.tif", out=out, class_lines=["water", "road"],
                             refine="sam", sam_model=str(lone))
    with pytest.raises(ModelError, match="do not fit the SAM configuration"):
        check_scale_options(options)


def test_the_driver_times_autos_runtimes_once_before_the_workers_start(tiny_model, tmp_path):
    """A scaled run under --runtime auto: the driver times the runtimes (once per computer and model shape) before
    its workers start, and they follow its figures; the workers, which share the cores, never time (they would
    time each other). The timing is no warning: not in the report's. A process of its own, for the cache folder."""
    cache = tmp_path / "cache"
    # The workers run one thread each (docs/SCALE.md's advice on CPU-only machines): the driver times at that
    # count, which the figures are kept for and the workers look them up by (it timed at its own before).
    done = scaled_cli_run(random_rgb(tmp_path / "large.tif", 700, 700), tiny_model, tmp_path / "o.gpkg", cache,
                          env={"FARSLIP_WORKER_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((cache / "encoders" / "runtime-speeds.json").read_text())
    assert len(records) == 1
    assert "|threads=1|" in next(iter(records.values()))["host"]
    speeds = next(iter(records.values()))["crops_per_s"]
    assert set(speeds) == {"openvino", "onnxruntime", "torch"} and all(value > 0 for value in speeds.values())
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert not [line for line in report["warnings"] if "timed" in line], report["warnings"]
    assert report["timings"]["runtimes_timed_s"] > 0
    # The chunks ran under the runtime the figures name fastest, and the report says so, as `segment`'s does.
    fastest = max(speeds, key=speeds.get)
    assert report["encoders"] == [fastest] and report["rasters"][0]["encoders"] == [fastest], (report, speeds)
