"""A run on Ray says what `farslip segment` says of each raster on its own.

Runs on Ray printed no warning at all and wrote none into their report (nor into a server job's result):
a 2-band raster whose second band went unused, a --simplify tolerance larger than the raster, a GeoJSON
in a projected CRS, a class list of one class were all silent, while the same raster alone said each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
from typer.testing import CliRunner

from backend.service.cli import app

pytest.importorskip("ray")  # the ray extra: installed by `make setup`

OPTIONS = ["-c", "water, lake", "--simplify", "1000000"]
runner = CliRunner()


@pytest.fixture(scope="module")
def rasters(shared_data, tmp_path_factory) -> list[Path]:
    """An RGB tile of a sample raster and a 2-band (grey, undefined) raster beside it, in one CRS."""
    folder = tmp_path_factory.mktemp("warned")
    with rasterio.open(shared_data / "RGB.byte.tif") as src:
        window = Window(300, 300, 320, 320)
        profile = dict(src.profile, width=320, height=320, transform=src.window_transform(window))
        rgb = src.read(window=window)
    colour = folder / "colour.tif"
    with rasterio.open(colour, "w", **profile) as dst:
        dst.write(rgb)
    two = folder / "two_band.tif"
    left, top = profile["transform"].c + 320 * 300.0, profile["transform"].f
    with rasterio.open(two, "w", driver="GTiff", width=320, height=320, count=2, dtype="uint8", crs=profile["crs"],
                       transform=from_origin(left, top, 300.0, 300.0)) as dst:
        dst.write(np.stack([rgb[0], rgb[2]]))
    return [colour, two]


def warnings_of(output: str) -> list[str]:
    return [line.removeprefix("Warning: ") for line in output.splitlines() if line.startswith("Warning: ")]


def test_a_scaled_run_says_each_rasters_warnings_under_its_name_as_segment_says_them(rasters, tiny_model,
                                                                                        local_ray, tmp_path):
    alone: dict[str, list[str]] = {}
    for raster in rasters:
        out = tmp_path / raster.stem / "result.geojson"
        out.parent.mkdir()
        result = runner.invoke(app, ["segment", str(raster), *OPTIONS, "--model", str(tiny_model), "--out", str(out)])
        assert result.exit_code == 0, result.output
        alone[raster.name] = json.loads(out.with_suffix(".report.json").read_text())["warnings"]
    # What the run says as a whole: the same sentence for each raster alone (the GeoJSON's CRS, one class).
    shared = [w for w in alone["colour.tif"] if w in alone["two_band.tif"]]
    assert any("result.geojson is in" in w for w in shared) and any("one class" in w.lower() for w in shared), shared
    assert any("band 2" in w.lower() for w in alone["two_band.tif"]), alone
    assert not any("band 2" in w.lower() for w in alone["colour.tif"]), alone

    out = tmp_path / "result.geojson"
    result = runner.invoke(app, ["segment", *map(str, rasters), *OPTIONS, "--model", str(tiny_model), "--out",
                                 str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    expected = shared + [f"{name}: {w}" for name in ("colour.tif", "two_band.tif") for w in alone[name]
                         if w not in shared]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["warnings"] == expected
    assert warnings_of(result.output) == expected
    # Each raster's own sentences are also kept with its facts in the report.
    per_raster = {Path(r["path"]).name: r["warnings"] for r in report["rasters"]}
    assert per_raster == {name: [w for w in alone[name] if w not in shared] for name in alone}
    assert any(w.startswith("two_band.tif: ") and "band 2" in w.lower() for w in report["warnings"])
    assert sum("--simplify 1e+06" in w for w in report["warnings"]) == 2
