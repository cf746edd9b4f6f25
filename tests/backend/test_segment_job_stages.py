"""After its last tile a segment job's message says what it does: making the polygons, checking regions, writing
the outputs. Before, it stayed "Segmenting: 9 of 9 tiles." (progress 0.99) through all of it, about half of a
small job's time."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_rasters import naip_corner

from backend.engine.temporary import new_run_tag
from backend.service.jobs import runners
from backend.service.jobs.model_cache import ModelCache


@pytest.fixture(scope="module")
def small_raster(tmp_path_factory, shared_data) -> Path:
    """A 300x300 corner of the NAIP sample: a few crops."""
    return naip_corner(shared_data, tmp_path_factory.mktemp("raster") / "naip_small.tif", 300)


class Control:
    """What the job worker gives a runner: its messages and progress, in the order they came."""

    def __init__(self):
        self.run_tag = new_run_tag()
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)

    def progress(self, done: int, total: int) -> None:
        self.said.append(f"{done} of {total} tiles")  # the worker's "Segmenting: N of M tiles."

    def should_cancel(self) -> bool:
        return False

    def will_create(self, prefixes) -> None:
        pass

    def restart_timing(self) -> None:
        pass

    def live_message(self, text: str) -> None:
        pass


@pytest.mark.parametrize(("region_checks", "checking"), [(True, "Checking regions."),
                                                         (False, "Estimating the quality.")])
def test_the_message_after_the_last_tile_says_what_the_job_does(small_raster, tiny_model, tmp_path, region_checks,
                                                                 checking):
    control = Control()
    request = {"raster": str(small_raster), "weights": str(tiny_model), "class_lines": ["water", "road"],
               "out": str(tmp_path / "x.gpkg"), "class_raster": str(tmp_path / "x.tif"), "min_area": 0,
               "region_checks": region_checks}
    result = runners.run_segment(request, control, ModelCache("cpu"))
    assert Path(result["outputs"]["vector"]).is_file()
    tiles = result["tiles"]
    last = control.said.index(f"{tiles} of {tiles} tiles")
    assert control.said[last + 1:] == ["Making polygons.", checking, "Writing the outputs."], control.said
