"""`segment --workers` takes rasters named in GDAL's syntax as `segment` does: a GeoPackage's raster table
(GPKG:a.gpkg:table), a netCDF variable, a zipped GeoTIFF (/vsizip//abs/a.zip/x.tif). They were 'does not exist'
(checked as files), their container was no input an output could not replace, and a resumed run knew them by
their name only (a rewritten archive or container reused the old chunks). Its outputs are checked as a
one-raster run checks them: the other parts of a shapefile too."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.scale.inputs import expand_inputs
from backend.scale.manifest import Manifest
from backend.service.cli import app

PROFILE = dict(width=48, height=48, count=3, dtype="uint8", crs="EPSG:32632",
               transform=Affine(2, 0, 500000, 0, -2, 5000000))
CLASSES = ["-c", "water", "-c", "tree"]


def pixels(seed: int) -> np.ndarray:
    patches = np.random.default_rng(seed).integers(0, 255, (3, 4, 4), dtype=np.uint8)
    return np.kron(patches, np.ones((12, 12), dtype=np.uint8))


def write_tif(path: Path, seed: int) -> Path:
    with rasterio.open(path, "w", driver="GTiff", **PROFILE) as ds:
        ds.write(pixels(seed))
    return path


def write_gpkg(path: Path, seed: int) -> Path:
    """Raster tables t1 and t2 (pixels of seed, seed + 1), written anew."""
    path.unlink(missing_ok=True)
    for i, table in enumerate(("t1", "t2")):
        with rasterio.open(path, "w", driver="GPKG", RASTER_TABLE=table, **({"APPEND_SUBDATASET": "YES"} if i else {}),
                           **PROFILE) as ds:
            ds.write(pixels(seed + i))
    return path


def write_zip(path: Path, seed: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(write_tif(path.with_name("staged.tif"), seed), "sub/scene.tif")
    path.with_name("staged.tif").unlink()
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """tmp_path, the working folder, with tables.gpkg (t1, t2) and scene.zip (sub/scene.tif)."""
    write_gpkg(tmp_path / "tables.gpkg", 0)
    write_zip(tmp_path / "scene.zip", 5)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_gdal_names_are_inputs_as_typed_and_each_raster_once(data):
    zipped = f"/vsizip/{data / 'scene.zip'}/sub/scene.tif"
    assert zipped.startswith("/vsizip//")
    assert expand_inputs(["GPKG:tables.gpkg:t1", zipped]) == ["GPKG:tables.gpkg:t1", zipped]
    # Two spellings of one table, of one member: one raster each.
    assert expand_inputs(["GPKG:tables.gpkg:t1", f"GPKG:{data / 'tables.gpkg'}:t1", "GPKG:./tables.gpkg:t2",
                          zipped, "/vsizip/scene.zip/sub/scene.tif"]) == [
        "GPKG:tables.gpkg:t1", "GPKG:./tables.gpkg:t2", zipped]
    # In a list, a relative container or archive is beside the list, as a relative file is.
    (data / "lists").mkdir()
    listing = data / "lists" / "rasters.txt"
    listing.write_text("GPKG:../tables.gpkg:t2\n/vsizip/../scene.zip/sub/scene.tif\nNETCDF:\"../missing.nc\":var\n")
    assert expand_inputs([listing]) == [f"GPKG:{data / 'tables.gpkg'}:t2", zipped,
                                        f'NETCDF:"{data / "missing.nc"}":var']


@pytest.mark.parametrize("kind", ["subdataset", "archive member"])
def test_a_rewritten_container_or_archive_is_another_input_on_resume(data, kind):
    from backend.scale.run import _input_facts

    name, rewrite = (("GPKG:tables.gpkg:t1", lambda: write_gpkg(data / "tables.gpkg", 7)) if kind == "subdataset"
                     else ("/vsizip/scene.zip/sub/scene.tif", lambda: write_zip(data / "scene.zip", 8)))
    before = _input_facts([name])
    assert before == _input_facts([name])
    assert before[0]["path"] == str(data.resolve() / ("tables.gpkg" if kind == "subdataset" else "scene.zip"))
    assert before[0]["name"] == ("GPKG:{}:t1" if kind == "subdataset" else "/vsizip/{}/sub/scene.tif")
    out = data / "out.gpkg"
    facts = {"inputs": before, "classes": ["water"]}
    Manifest.open(out, facts, restart=False).close()
    rewrite()
    after = _input_facts([name])
    assert after != before
    with pytest.raises(InputError, match=r"other inputs \(rasters, or files they read"):
        Manifest.open(out, {**facts, "inputs": after}, restart=False)
    # Another table of the same file is another input.
    assert kind != "subdataset" or _input_facts(["GPKG:tables.gpkg:t2"]) != after


def no_workers(*args, **kwargs):
    raise AssertionError("the run started computing")


def test_outputs_are_checked_against_the_container_and_a_shapefiles_parts_before_anything_is_computed(
        data, tiny_model, monkeypatch):
    monkeypatch.setattr("backend.scale.run.Workers", no_workers)
    gpkg = data / "tables.gpkg"
    before = gpkg.read_bytes()

    def run(raster, *args):
        return CliRunner().invoke(app, ["segment", raster, *CLASSES, "--model", str(tiny_model), "--workers", "1",
                                        "--quiet", *args])

    over = run("GPKG:tables.gpkg:t1", "--out", str(gpkg), "--overwrite")
    assert over.exit_code == 2 and "is the input raster" in over.output and "destroy" in over.output, over.output
    assert gpkg.read_bytes() == before
    (data / "result.dbf").write_text("another shapefile's table")
    beside = run(str(write_tif(data / "plain.tif", 3)), "--out", "result.shp")  # a plain file: the same check
    assert beside.exit_code == 2, beside.output
    assert "would replace result.dbf" in beside.output and "--overwrite" in beside.output
    assert not (data / "result.shp.partial").exists()


def test_a_scaled_run_segments_a_geopackage_table_and_a_zipped_geotiff(data, tiny_model):
    """The run starts its own local Ray, whose workers open the names from the run's working folder."""
    pytest.importorskip("ray")  # the ray extra: installed by `make setup`
    zipped = f"/vsizip/{data / 'scene.zip'}/sub/scene.tif"
    result = CliRunner().invoke(app, ["segment", "GPKG:tables.gpkg:t2", zipped, *CLASSES, "--model", str(tiny_model),
                                      "--out", "all.gpkg", "--workers", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((data / "all.report.json").read_text())
    assert [r["path"] for r in report["rasters"]] == ["GPKG:tables.gpkg:t2", zipped]
    assert pyogrio.read_info(data / "all.gpkg")["features"] > 0
