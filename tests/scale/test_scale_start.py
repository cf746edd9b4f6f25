"""Before and while Ray starts: a class VRT that cannot place the rasters is refused in one sentence before Ray
starts; a start of Ray that fails or is interrupted (Ctrl+C in ray.init) says so in one line, leaves no Ray
running and no partial folder in the next run's way."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CLASSES = ["-c", "water", "-c", "tree"]


@pytest.fixture(autouse=True)
def no_ray_yet():
    """Each test starts without a Ray (as `farslip segment` does) and keeps its Ctrl+C handler."""
    if ray.is_initialized():
        ray.shutdown()
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
    assert not ray.is_initialized(), "Ray was left running"


def write_image(path: Path, transform: Affine, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=transform) as ds:
        ds.write(pixels)
    return path


def run_segment(inputs, out: Path, model: Path, *extra):
    return CliRunner().invoke(app, ["segment", *map(str, inputs), *CLASSES, "--model", str(model), "--out", str(out),
                                    "--workers", "1", "--quiet", *map(str, extra)])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_a_class_vrt_over_rotated_rasters_is_refused_before_ray_starts(tiny_model, tmp_path, monkeypatch):
    rotated = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(2, -2)
    inputs = [write_image(tmp_path / "in" / "a.tif", rotated),
              write_image(tmp_path / "in" / "b.tif", Affine.translation(300, 0) @ rotated)]
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "out" / "all.gpkg"
    out.parent.mkdir()
    result = run_segment(inputs, out, tiny_model, "--class-raster", out.with_name("classes.vrt"))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "cannot place rotated rasters" in line and "a.tif has a rotated grid" in line
    assert "one at a time with --class-raster x.tif" in line and "north-up" in line
    assert list(out.parent.iterdir()) == []


def test_a_class_vrt_over_north_up_and_south_up_rasters_is_refused(tiny_model, tmp_path, monkeypatch):
    inputs = [write_image(tmp_path / "in" / "a.tif", Affine(2, 0, 500000, 0, -2, 5000000)),
              write_image(tmp_path / "in" / "b.tif", Affine(2, 0, 500200, 0, 2, 5000000))]
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "out" / "all.gpkg"
    out.parent.mkdir()
    result = run_segment(inputs, out, tiny_model, "--prob-raster", out.with_name("probs.vrt"))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "--prob-raster" in line and "north-up and others south-up" in line
    assert list(out.parent.iterdir()) == []


def test_ctrl_c_while_ray_starts_shuts_it_down_and_says_nothing_was_kept(tiny_model, tmp_path, monkeypatch):
    started = ray.init

    def interrupted_init(*args, **kwargs):
        started(*args, **kwargs)  # Ray's processes run: Ctrl+C came at the end of ray.init
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", interrupted_init)
    raster = write_image(tmp_path / "in" / "a.tif", Affine(2, 0, 500000, 0, -2, 5000000))
    out = tmp_path / "out" / "a.gpkg"
    out.parent.mkdir()
    result = run_segment([raster], out, tiny_model)
    assert result.exit_code == 130, result.output
    assert error_lines(result.output) == ["Interrupted; nothing was finished, so nothing was kept."]
    assert not ray.is_initialized()
    assert list(out.parent.iterdir()) == []  # no a.gpkg.partial either


def test_ray_that_cannot_start_is_one_sentence_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    def failing_init(*args, **kwargs):
        raise ConnectionError("Failed to connect to GCS at 10.0.0.9:6379.\nDetails: timed out")

    monkeypatch.setattr(ray, "init", failing_init)
    raster = write_image(tmp_path / "in" / "a.tif", Affine(2, 0, 500000, 0, -2, 5000000))
    out = tmp_path / "out" / "a.gpkg"
    out.parent.mkdir()
    result = run_segment([raster], out, tiny_model, "--cluster", "ray://10.0.0.9:10001")
    assert result.exit_code == 2, result.output
    assert error_lines(result.output) == [
        "Error: Could not connect to the Ray cluster at ray://10.0.0.9:10001 (Failed to connect to GCS at "
        "10.0.0.9:6379.); check the address and that the cluster is up."]
    assert list(out.parent.iterdir()) == []
