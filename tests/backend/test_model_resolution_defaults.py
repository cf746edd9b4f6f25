"""A fine-tuned model's resolution, and how it resamples, travel in the options with_model_defaults returns.

A model trained on its raster's own grid (lon/lat pixels at 60 degrees north: twice as tall on the ground as
wide) records its pixels' width; a run keeps the raster's pixel shape at that width, a model trained at a
--gsd resamples to square ground pixels. The server's check before queueing a job, the job and the command
line must all open the same processing grid: the check took the model's resolution as square pixels, so it
refused (or sized) an own-grid job by twice its rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import typer.main
import typer.testing

from backend.engine import raster as raster_module
from backend.engine.errors import InputError
from backend.engine.models import load_model
from backend.engine.options import SegmentOptions, option_fields
from backend.engine.raster import native_ground_size
from backend.engine.segment import segment_raster, with_model_defaults
from backend.engine.temporary import new_run_tag
from backend.service.cli import app
from backend.service.jobs import check_segment_job, run_segment
from backend.service.jobs.model_cache import ModelCache
from backend.service.schemas import SegmentRequest, options_from_request

SIZE = 64
NORTH = rasterio.Affine(4e-5, 0, 10.0, 0, -4e-5, 60.0)  # 2.2 m wide, 4.5 m tall on the ground


@pytest.fixture
def northern(tmp_path) -> Path:
    path = tmp_path / "north.tif"
    rgb = np.random.default_rng(0).integers(1, 255, (3, SIZE, SIZE), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs="EPSG:4326", transform=NORTH) as ds:
        ds.write(rgb)
    return path


def pixel_width_m(raster: Path) -> float:
    with rasterio.open(raster) as ds:
        width, height = native_ground_size(ds)
    assert height == pytest.approx(2 * width, rel=1e-3)
    return width


def fine_tuned(folder: Path, tiny_model: Path, gsd_m: float, own_grid: bool) -> Path:
    """A fine-tuned model folder (the tiny weights) trained at `gsd_m`: on its raster's own grid (its
    pixels' width recorded), or resampled to square ground pixels (two factors recorded, scale_y)."""
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(tiny_model.read_bytes())
    processing = {"scale": 1.0, "bands": [1, 2, 3], "bands_chosen": None, "gsd_m": gsd_m}
    if not own_grid:
        processing["scale_y"] = 2.0
    (folder / "farslip_model.json").write_text(json.dumps({
        "format": "farslip-finetuned/1", "name": folder.name, "class_lines": ["building", "ground"],
        "processing": processing}))
    return folder


class Control:
    """What run_segment asks of the worker's JobControl."""

    run_tag = new_run_tag()

    def message(self, text: str) -> None:
        pass

    def progress(self, done: int, total: int) -> None:
        pass

    def should_cancel(self) -> bool:
        return False

    def will_create(self, prefixes) -> None:
        pass

    def restart_timing(self) -> None:
        pass


@pytest.fixture
def opened(monkeypatch) -> list[tuple[int, int]]:
    """(rows, columns) of the processing grid of every raster check_inputs opens."""
    grids: list[tuple[int, int]] = []
    real = raster_module.open_source

    def recording(*args, **kwargs):
        source = real(*args, **kwargs)
        grids.append((source.height, source.width))
        return source

    monkeypatch.setattr(raster_module, "open_source", recording)
    return grids


@pytest.mark.parametrize("own_grid, grid", [(True, (3 * SIZE, 3 * SIZE)), (False, (6 * SIZE, 3 * SIZE))],
                         ids=["own-grid", "square"])
def test_the_submit_check_opens_the_grid_the_server_job_segments(northern, tiny_model, tmp_path, opened, own_grid,
                                                                  grid):
    model = fine_tuned(tmp_path / "model", tiny_model, pixel_width_m(northern) / 3, own_grid)
    request = {"raster": str(northern), "model": str(model), "out": str(tmp_path / "run.gpkg"),
               "region_checks": False}
    check_segment_job(options_from_request(request), "cpu")
    assert opened[-1] == grid  # the check took an own-grid model's pixels as square: twice the rows
    run_segment(request, Control(), ModelCache("cpu"))
    window = json.loads((tmp_path / "run.report.json").read_text())["pixel_window"]
    assert (window["height"], window["width"]) == grid


def test_an_own_grid_model_the_job_can_run_is_not_refused_at_submit(northern, tiny_model, tmp_path):
    """5 times finer across keeps 5 times finer down: in the engine's range (8), where square pixels (10) are not."""
    width = pixel_width_m(northern)
    own = fine_tuned(tmp_path / "own", tiny_model, width / 5, own_grid=True)
    assert check_segment_job(SegmentOptions(raster=northern, model=str(own), out=tmp_path / "a.gpkg"), "cpu")
    square = fine_tuned(tmp_path / "square", tiny_model, width / 5, own_grid=False)
    with pytest.raises(InputError, match=f"The model {square} was fine-tuned on"):
        check_segment_job(SegmentOptions(raster=northern, model=str(square), out=tmp_path / "b.gpkg"), "cpu")
    too_fine = fine_tuned(tmp_path / "too-fine", tiny_model, width / 10, own_grid=True)
    with pytest.raises(InputError, match=f"The model {too_fine} was fine-tuned on .* by 10"):
        check_segment_job(SegmentOptions(raster=northern, model=str(too_fine), out=tmp_path / "c.gpkg"), "cpu")


def test_model_defaults_applied_twice_are_the_same_options_and_the_same_run(northern, tiny_model, tmp_path):
    loaded = load_model(str(fine_tuned(tmp_path / "model", tiny_model, pixel_width_m(northern) / 2, True)),
                        device="cpu")
    given = SegmentOptions(raster=northern, out=tmp_path / "a.gpkg", region_checks=False)
    once = with_model_defaults(given, loaded)
    assert once.square_gsd is False and math.isclose(once.gsd_m or 0, pixel_width_m(northern) / 2)
    assert with_model_defaults(once, loaded) == once
    # A resolution the user gives resamples to square pixels, whatever the model's.
    assert with_model_defaults(SegmentOptions(raster=northern, gsd_m=3.0), loaded).square_gsd is True
    runs = [segment_raster(options, loaded).report["pixel_window"]
            for options in (given, replace(once, out=tmp_path / "b.gpkg"))]
    assert [(w["height"], w["width"]) for w in runs] == [(2 * SIZE, 2 * SIZE)] * 2


def test_the_square_decision_is_no_option_of_the_command_line_or_the_request():
    assert "square_gsd" not in {item.name for item in option_fields()}
    assert "square_gsd" not in SegmentRequest.model_json_schema()["properties"]
    assert "square_gsd" not in {param.name for param in typer.main.get_command(app).commands["segment"].params}
    with pytest.raises(TypeError, match="unknown segment options: square_gsd"):
        options_from_request({"raster": "/x.tif", "out": "/x.gpkg", "square_gsd": False})
    assert "square_gsd" not in SegmentOptions(raster="/x.tif").processing()


def test_a_scaled_run_given_defaulted_options_keeps_how_the_resolution_resamples(northern, tiny_model, tmp_path):
    """segment --workers builds its workers' settings from the options: from defaulted ones too, an own-grid
    model's resolution must keep the raster's pixel shape there (square_gsd was dropped, so square pixels)."""
    from backend.scale.worker import engine_settings

    loaded = load_model(str(fine_tuned(tmp_path / "model", tiny_model, pixel_width_m(northern) / 2, True)),
                        device="cpu")
    once = with_model_defaults(SegmentOptions(raster=northern, out=tmp_path / "a.gpkg"), loaded)
    settings = engine_settings(once)
    assert settings.gsd_m == once.gsd_m and settings.square_gsd is False


def test_a_resolution_the_model_set_is_refused_as_the_models_on_the_command_line(northern, tiny_model, tmp_path):
    """`segment --model my-model/` on a raster 10 times coarser than the training one said '--gsd 0.2 would
    resample ...', an option the user never typed; the server already said it was the model's resolution."""
    too_fine = fine_tuned(tmp_path / "too-fine", tiny_model, pixel_width_m(northern) / 10, own_grid=True)
    result = typer.testing.CliRunner().invoke(app, ["segment", str(northern), "--model", str(too_fine), "--out",
                                                    str(tmp_path / "run.gpkg"), "--no-region-checks"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith(f"Error: The model {too_fine} was fine-tuned on ")
    assert "m pixels, so it segments at that resolution unless --scale or --gsd says otherwise: --gsd " in said
    assert not (tmp_path / "run.gpkg").exists()
