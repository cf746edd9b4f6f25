"""Which rasters a folder or glob gives a run on Ray: farslip's outputs of earlier runs are left out only where
a report says a run wrote that very file, and the run says which it left out; a run's working folder
(<out>.partial/) is never input. The rasters given are recorded in place of the run on Ray (no Ray starts)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.service.cli import app
from test_scale_outputs import CLASSES, write_image


@pytest.fixture
def given(monkeypatch) -> list[list[str]]:
    """The rasters each run on Ray was given; the run stops there (exit 2, one sentence)."""
    runs: list[list[str]] = []

    def recorded(paths, *args, **kwargs):
        runs.append(list(paths))
        raise InputError("stopped by the test")

    monkeypatch.setattr("backend.scale.run.segment_rasters", recorded)
    return runs


def segment(*args) -> object:
    return CliRunner().invoke(app, ["segment", *map(str, args), *CLASSES])


def test_a_raster_named_like_another_runs_output_elsewhere_is_segmented(given, tiny_model, tmp_path):
    """A report in the folder names other/t1.tif as its class raster: tiles/t1.tif, the user's raster of the
    same name, is segmented; tiles/s_classes.tif, written there by a run, is left out, and the run says so."""
    tiles = tmp_path / "tiles"
    for number in range(2):
        write_image(tiles / f"t{number}.tif", 500000 + 100 * number, number)
    (tmp_path / "other").mkdir()
    first = segment(tiles / "t0.tif", "--model", tiny_model, "--out", tiles / "r.gpkg",
                    "--class-raster", tmp_path / "other" / "t1.tif", "--quiet")
    assert first.exit_code == 0, first.output
    second = segment(tiles / "t0.tif", "--model", tiny_model, "--out", tiles / "s.gpkg",
                     "--class-raster", tiles / "s_classes.tif", "--quiet")
    assert second.exit_code == 0, second.output

    result = segment(tiles, "--model", tiny_model, "--workers", 1, "--out", tmp_path / "all.gpkg")
    assert given == [[str(tiles / "t0.tif"), str(tiles / "t1.tif")]]
    assert result.exit_code == 2 and "stopped by the test" in result.output
    assert ("Left out 1 raster file of the folders and patterns given that an earlier farslip run wrote (an output, "
            f"not imagery): {tiles / 's_classes.tif'}; name it on its own to segment it.") in result.output
    assert "segmenting 2 raster(s)" in result.output


def test_a_report_of_an_older_version_with_relative_paths_names_its_own_files(given, tiny_model, tmp_path,
                                                                              monkeypatch):
    """Older reports recorded the outputs as given, relative to where the run ran (told by the report's own
    place): tiles/c.tif from a run in tmp_path is an output; a path relative to an unknown folder names none."""
    tiles = tmp_path / "tiles"
    for name in ("a.tif", "c.tif", "d.tif"):
        write_image(tiles / name, 500000, 1)
    (tiles / "r.report.json").write_text(json.dumps(
        {"farslip_version": "0.1", "outputs": {"vector": "tiles/r.gpkg", "class_raster": "tiles/c.tif"}}))
    (tiles / "s.report.json").write_text(json.dumps(
        {"farslip_version": "0.1", "outputs": {"vector": "elsewhere/s.gpkg", "class_raster": "d.tif"}}))
    monkeypatch.chdir(tiles)
    segment("*.tif", "--model", tiny_model, "--workers", 1, "--out", tmp_path / "all.gpkg")
    assert given == [["a.tif", "d.tif"]]


def test_a_recursive_glob_over_the_output_folder_leaves_out_the_unfinished_runs_working_folder(given, tiny_model,
                                                                                                 tmp_path):
    """Interrupted, a run keeps its finished rasters' files in <out>.partial/ inside the globbed folder: the same
    command gets the same rasters (and resumes), never those files, and says nothing of them."""
    from backend.scale.manifest import Manifest

    tiles = tmp_path / "tiles"
    rasters = [write_image(tiles / "a.tif", 500000, 1), write_image(tiles / "sub" / "b.tif", 500200, 2)]
    manifest = Manifest.open(tiles / "res.gpkg", {"inputs": "as the first run read them"}, restart=False)
    manifest.close()
    for name in ("classes.tif", "score.tif", "signals.tif"):
        write_image(manifest.raster_folder(1) / name, 500000, 3)
    result = segment(tiles / "**" / "*.tif", "--model", tiny_model, "--workers", 1, "--out", tiles / "res.gpkg")
    assert given == [[str(path) for path in rasters]]
    assert "segmenting 2 raster(s)" in result.output and "Left out" not in result.output
