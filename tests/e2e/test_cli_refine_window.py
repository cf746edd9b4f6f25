"""A refinement reads a halo around the window asked for; only the window's own pixels count as segmented: a
--bbox of nodata inside a raster with data around it is refused (exit 4) with --refine edges as without, and
the report's valid_pixels are the window's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from backend.service.cli import app


@pytest.fixture
def holed(tmp_path) -> Path:
    """300 x 300 px at 5 m with nodata 0 and a 100 x 120 px hole of nodata at rows 100..200, cols 150..270."""
    rng = np.random.default_rng(3)
    pixels = np.kron(rng.integers(1, 255, (3, 10, 10), dtype=np.uint8), np.ones((30, 30), np.uint8))
    pixels[:, 100:200, 150:270] = 0
    path = tmp_path / "holed.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 5, 5)) as dst:
        dst.write(pixels)
    return path


def segment(raster: Path, out: Path, model: Path, *extra):
    return CliRunner().invoke(app, ["segment", str(raster), "-c", "water", "-c", "road", "--model", str(model),
                                    "--out", str(out), "--quiet", *map(str, extra)])


@pytest.mark.parametrize("refine", ["none", "edges"])
def test_a_bbox_of_nodata_is_refused_with_or_without_refinement(refine, holed, tiny_model, tmp_path):
    hole = (500000 + 150 * 5, 4000000 - 200 * 5, 500000 + 270 * 5, 4000000 - 100 * 5)  # the hole: data around
    result = segment(holed, tmp_path / "o.gpkg", tiny_model, "--refine", refine, "--bbox", *hole)
    assert result.exit_code == 4, result.output
    assert "holds only nodata or masked pixels: there is nothing to segment" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holed.tif"]


@pytest.mark.parametrize("refine", ["none", "edges"])
def test_valid_pixels_are_those_of_the_window_asked_for(refine, holed, tiny_model, tmp_path):
    """A window of 60 x 50 px at the raster's left edge, none of it nodata: 3000 valid pixels, not the halo's."""
    box = (500000, 4000000 - 50 * 5, 500000 + 60 * 5, 4000000)
    result = segment(holed, tmp_path / "o.gpkg", tiny_model, "--refine", refine, "--bbox", *box)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o.report.json").read_text(encoding="utf-8"))
    assert (report["pixel_window"]["height"], report["pixel_window"]["width"]) == (50, 60)
    assert report["valid_pixels"] == 3000


def test_a_plain_run_over_a_refined_result_names_the_earlier_unrefined_polygons_it_leaves(holed, tiny_model,
                                                                                           tmp_path):
    """`--refine edges` wrote o.gpkg and o_coarse.gpkg; `--refine none --overwrite` replaces o.gpkg and its
    report, and o_coarse.gpkg (the user's file now) stays but is said to be the earlier run's."""
    box = (500000, 4000000 - 50 * 5, 500000 + 60 * 5, 4000000)
    refined = segment(holed, tmp_path / "o.gpkg", tiny_model, "--refine", "edges", "--bbox", *box)
    assert refined.exit_code == 0, refined.output
    coarse = tmp_path / "o_coarse.gpkg"
    before = coarse.read_bytes()
    plain = segment(holed, tmp_path / "o.gpkg", tiny_model, "--refine", "none", "--overwrite", "--bbox", *box)
    assert plain.exit_code == 0, plain.output
    assert "o_coarse.gpkg beside the output holds the unrefined polygons of the earlier --refine run" in plain.output
    report = json.loads((tmp_path / "o.report.json").read_text(encoding="utf-8"))
    assert any("o_coarse.gpkg" in warning for warning in report["warnings"])
    assert "coarse_vector" not in report["outputs"]
    assert coarse.read_bytes() == before
    again = segment(holed, tmp_path / "o.gpkg", tiny_model, "--refine", "none", "--overwrite", "--bbox", *box)
    assert again.exit_code == 0 and "o_coarse.gpkg" not in again.output  # the report it replaced no longer names it


@pytest.mark.parametrize("command", ["segment", "classify"])
def test_a_raster_of_nan_without_a_nodata_tag_is_said_so_not_sent_to_another_extent(command, tiny_model, tmp_path):
    """No extent was asked for: the sentence points at the raster's values and nodata tag."""
    raster = tmp_path / "allnan.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=100, height=100, count=1, dtype="float32",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 5, 5)) as dst:
        dst.write(np.full((1, 100, 100), np.nan, np.float32))
    out = tmp_path / ("o.gpkg" if command == "segment" else "t.gpkg")
    result = CliRunner().invoke(app, [command, str(raster), "-c", "water", "-c", "road", "--model", str(tiny_model),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 4, result.output
    said = " ".join(result.output.split())
    assert f"{raster} holds only nodata or masked pixels (or NaN): there is nothing to {command}." in said
    assert "nodata value" in said and "another extent" not in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allnan.tif"]
