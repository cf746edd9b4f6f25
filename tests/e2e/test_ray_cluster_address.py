"""`segment --cluster http://x`: Ray's error was quoted cut off mid-sentence ("... To fix this, either:)"). Now the
quote ends on a whole sentence, and an http:// address (the dashboard's) is told which addresses Ray takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

RAYS_OWN = ("Invalid Ray address: 'http://x'. It looks like you set RAY_ADDRESS to an HTTP address (e.g. the API "
            "server address). To fix this, either:\n  1. Unset RAY_ADDRESS if you are running from a Ray node, or\n"
            "  2. Set RAY_ADDRESS to the GCS address instead (e.g. <head_node_ip>:6379).")


@pytest.fixture(autouse=True)
def no_ray_left():
    if ray.is_initialized():
        ray.shutdown()
    yield
    assert not ray.is_initialized(), "Ray was left running"


def _cluster_run(tmp_path: Path, model: Path, address: str):
    raster = tmp_path / "in" / "a.tif"
    raster.parent.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    with rasterio.open(raster, "w", driver="GTiff", width=48, height=48, count=3, dtype="uint8", crs="EPSG:32632",
                       transform=Affine(2, 0, 500000, 0, -2, 5000000)) as ds:
        ds.write(pixels)
    out = tmp_path / "out" / "a.gpkg"
    out.parent.mkdir()
    result = CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "tree", "--model", str(model),
                                      "--out", str(out), "--quiet", "--cluster", address])
    return result, out


def test_rays_error_is_quoted_up_to_its_last_whole_sentence(tiny_model, tmp_path, monkeypatch):
    def failing_init(*args, **kwargs):
        raise ValueError(RAYS_OWN)

    monkeypatch.setattr(ray, "init", failing_init)
    result, out = _cluster_run(tmp_path, tiny_model, "http://x")
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "Error: Could not connect to the Ray cluster at http://x (Invalid Ray address: 'http://x'. It looks like you "
        "set RAY_ADDRESS to an HTTP address (e.g. the API server address).); give the cluster's GCS address "
        "(HOST:6379) or its client address (ray://HOST:10001), not the dashboard's http:// one."]
    assert list(out.parent.iterdir()) == []


def test_an_http_address_with_rays_own_error(tiny_model, tmp_path):
    result, out = _cluster_run(tmp_path, tiny_model, "http://x")
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("Error: Could not connect to the Ray cluster at http://x (")
    assert "either:" not in line and line.endswith("not the dashboard's http:// one.")
    assert list(out.parent.iterdir()) == []
