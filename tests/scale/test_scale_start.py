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


ROTATED = Affine.translation(500000, 5000000) @ Affine.rotation(30) @ Affine.scale(2, -2)
# (grids of a.tif and b.tif, the mosaic option, phrases of the refusal)
VRT_REFUSALS = {
    "rotated": ((ROTATED, Affine.translation(300, 0) @ ROTATED), "--class-raster",
                ("cannot place rotated rasters", "a.tif has a rotated grid", "one at a time with --class-raster x.tif",
                 "north-up")),
    "north-up and south-up": ((Affine(2, 0, 500000, 0, -2, 5000000), Affine(2, 0, 500200, 0, 2, 5000000)),
                              "--prob-raster", ("--prob-raster", "north-up and others south-up")),
}


@pytest.mark.parametrize("case", VRT_REFUSALS)
def test_a_vrt_mosaic_that_cannot_place_the_rasters_is_refused_before_ray_starts(case, tiny_model, tmp_path,
                                                                                   monkeypatch):
    grids, option, phrases = VRT_REFUSALS[case]
    inputs = [write_image(tmp_path / "in" / name, grid) for name, grid in zip(("a.tif", "b.tif"), grids)]
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "out" / "all.gpkg"
    out.parent.mkdir()
    result = run_segment(inputs, out, tiny_model, option, out.with_name("mosaic.vrt"))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert all(phrase in line for phrase in phrases), line
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


def _cluster_run(tmp_path: Path, model: Path, address: str):
    """`segment a.tif --cluster ADDRESS` into an empty folder: (the result, the output's path)."""
    raster = write_image(tmp_path / "in" / "a.tif", Affine(2, 0, 500000, 0, -2, 5000000))
    out = tmp_path / "out" / "a.gpkg"
    out.parent.mkdir()
    return run_segment([raster], out, model, "--cluster", address), out


def test_ray_that_cannot_start_is_one_sentence_and_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    def failing_init(*args, **kwargs):
        raise ConnectionError("Failed to connect to GCS at 10.0.0.9:6379.\nDetails: timed out")

    monkeypatch.setattr(ray, "init", failing_init)
    result, out = _cluster_run(tmp_path, tiny_model, "ray://10.0.0.9:10001")
    assert result.exit_code == 2, result.output
    assert error_lines(result.output) == [
        "Error: Could not connect to the Ray cluster at ray://10.0.0.9:10001 (Failed to connect to GCS at "
        "10.0.0.9:6379.); check the address and that the cluster is up."]
    assert list(out.parent.iterdir()) == []


def test_a_ray_client_address_without_rays_client_package_says_what_to_install(tiny_model, tmp_path, monkeypatch):
    """The ray extra lacked ray[client]: every ray:// address failed with 'check the address', Ray's own advice
    in brackets; and Ray's client printed a UserWarning with a library path before timing out."""
    def without_client(*args, **kwargs):
        import warnings

        warnings.warn("Ray Client connection timed out. See https://docs.ray.io", UserWarning, stacklevel=1)
        raise RuntimeError("Ray Client requires pip package `ray[client]`. If you installed the minimal Ray (e.g. "
                           "`pip install ray`), please reinstall by executing `pip install ray[client]`.")

    monkeypatch.setattr(ray, "init", without_client)
    result, out = _cluster_run(tmp_path, tiny_model, "ray://head:10001")
    assert result.exit_code == 2, result.output
    assert error_lines(result.output) == [
        "Error: Connecting to the Ray cluster at ray://head:10001 needs Ray's client package, which this backend "
        "lacks: pip install 'ray[client]' in the backend's environment (make setup installs it), then run again."]
    assert "UserWarning" not in result.output
    assert list(out.parent.iterdir()) == []


def test_the_ray_extra_installs_rays_client():
    """A ray:// address (--cluster, FARSLIP_RAY_ADDRESS, the plugin's Ray cluster setting) needs it."""
    import importlib.util

    assert importlib.util.find_spec("grpc") is not None
    assert '"ray[client]' in (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
