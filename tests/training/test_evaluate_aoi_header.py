"""`farslip evaluate --aoi AREA` scores only the labelled pixels inside the area, but its header said "on all
labelled pixels of RASTER". It now says the pixels inside the area of --aoi were scored."""

from __future__ import annotations

import shapely
from training_data import RASTER_CRS, write_labels
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


def header(raster, labels, model, *extra) -> str:
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--weights",
                                 str(model), "--device", "cpu", "-q", *map(str, extra)])
    assert result.exit_code == 0, result.output
    return next(line for line in result.output.splitlines() if line.startswith(f"{model.stem} on "))


def test_the_header_says_which_pixels_were_scored(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    # The top half of the synthetic raster (384 pixels of 2 m from 500000, 5000000).
    area = write_labels(tmp_path / "strip.gpkg", [shapely.box(500000, 5000000 - 384, 500000 + 768, 5000000)],
                        ["a"], RASTER_CRS)
    assert header(raster, labels, tiny_model, "--aoi", area) == (
        f"{tiny_model.stem} on the labelled pixels of synthetic.tif inside the area of --aoi {area}")
    assert header(raster, labels, tiny_model) == f"{tiny_model.stem} on all labelled pixels of synthetic.tif"
