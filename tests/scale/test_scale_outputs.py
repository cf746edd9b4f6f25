"""The outputs of a scaled run appear together or not at all: a <name>_rasters folder in the way is refused
before anything is computed, and a run that fails while writing leaves every old output as it was. Outputs
written into the input folder are not segmented by the next run over that folder. Tiny rasters, one worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.service.cli import app

ray = pytest.importorskip("ray")  # the ray extra: installed by `make setup`

CLASSES = ["-c", "water", "-c", "tree"]


def write_image(path: Path, left: float, seed: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    patches = np.random.default_rng(seed).integers(0, 255, (3, 4, 4), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=Affine(2, 0, left, 0, -2, 5000000)) as ds:
        ds.write(np.kron(patches, np.ones((size // 4, size // 4), dtype=np.uint8)))
    return path


def run_segment(inputs, folder: Path, model: Path, *extra):
    return CliRunner().invoke(app, ["segment", *map(str, inputs), *CLASSES, "--model", str(model),
                                    "--out", str(folder / "h.gpkg"), "--class-raster", str(folder / "c.vrt"),
                                    "--prob-raster", str(folder / "p.vrt"), "--workers", "1", "--quiet",
                                    *map(str, extra)])


def no_workers(*args, **kwargs):
    raise AssertionError("the run started computing")


@pytest.mark.parametrize("case, words", [
    ("leftover folder", "p_rasters already exists"),
    ("foreign file", "c_rasters holds files a run did not write"),
    ("input inside", "c_rasters holds the input raster 2"),
])
def test_a_rasters_folder_in_the_way_is_refused_before_anything_is_computed(case, words, tiny_model, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr("backend.scale.run.Workers", no_workers)
    inputs = [write_image(tmp_path / "in" / "a.tif", 500000, 1)]
    extra = []
    if case == "leftover folder":
        (tmp_path / "p_rasters").mkdir()  # its p.vrt deleted, the folder left
    elif case == "foreign file":
        (tmp_path / "c_rasters").mkdir()
        (tmp_path / "c_rasters" / "notes.txt").write_text("mine")
        extra = ["--overwrite"]
    else:
        inputs.append(write_image(tmp_path / "c_rasters" / "b.tif", 500200, 2))
        extra = ["--overwrite"]
    result = run_segment(inputs, tmp_path, tiny_model, *extra)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert not any((tmp_path / name).exists() for name in ("h.gpkg", "c.vrt", "p.vrt", "h.gpkg.partial"))


def test_outputs_in_the_input_folder_are_replaced_all_together_and_never_segmented(local_ray, tiny_model, tmp_path,
                                                                                   monkeypatch):
    """A re-run over the folder the last run wrote into segments its two rasters, not the class and probability
    VRTs; when writing the probability VRT fails, the class VRT, its folder and the layer stay the old ones;
    a statistics file QGIS left in p_rasters/ is replaced with the rest."""
    folder = tmp_path / "in"
    write_image(folder / "a.tif", 500000, 1)
    write_image(folder / "b.tif", 500200, 2)
    assert run_segment([folder], folder, tiny_model).exit_code == 0
    (folder / "p_rasters" / "a.tif.aux.xml").write_text("<PAMDataset/>")  # gdalinfo -stats, QGIS
    old = {name: (folder / name).read_bytes() for name in ("h.gpkg", "c.vrt", "c_rasters/a.tif", "p.vrt")}

    from backend.scale import merge

    def failing_probability_vrt(path, *args, **kwargs):
        if ".p.vrt" in path.name:
            raise OSError("No space left on device")
        return merge.write_raster_vrt(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("backend.scale.run.write_raster_vrt", failing_probability_vrt)
        failed = run_segment([folder], folder, tiny_model, "-c", "road", "--overwrite")
    # A sentence, not a traceback: the disk filling up while the outputs are staged, as when they are renamed.
    assert failed.exit_code == 2 and "Not enough space on the disk for" in failed.output, failed.output
    assert {name: (folder / name).read_bytes() for name in old} == old
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left

    result = run_segment([folder], folder, tiny_model, "-c", "road", "--overwrite")  # resumes the finished rasters
    assert result.exit_code == 0, result.output
    report = json.loads((folder / "h.report.json").read_text())
    assert [Path(r["path"]).name for r in report["rasters"]] == ["a.tif", "b.tif"]
    assert sorted(p.name for p in (folder / "p_rasters").iterdir()) == ["a.tif", "b.tif"]
    assert (folder / "c.vrt").read_bytes() != old["c.vrt"]  # three classes now
