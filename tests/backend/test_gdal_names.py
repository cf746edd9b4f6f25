"""Raster names GDAL resolves itself, read in one place (backend.engine.files) for every command and the caches.

Real files: a GeoPackage of two raster tables, a zipped GeoTIFF, a gzipped one; a subdataset's file is the part of
its name that is a file here, wherever the driver puts it; an archive is the file a /vsizip/ path reads.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from backend.engine import feature_cache, files

PROFILE = dict(width=40, height=30, count=3, dtype="uint8", crs="EPSG:32633",
               transform=from_origin(500000, 5000000, 2.0, 2.0))


def write_tif(path: Path, seed: int = 0) -> Path:
    with rasterio.open(path, "w", driver="GTiff", **PROFILE) as ds:
        ds.write(np.random.default_rng(seed).integers(1, 255, (3, 30, 40), dtype=np.uint8))
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working folder, holding scene.tif, scene.zip (sub/scene.tif), scene.tif.gz and
    tables.gpkg (raster tables t1, t2)."""
    tif = write_tif(tmp_path / "scene.tif")
    with zipfile.ZipFile(tmp_path / "scene.zip", "w") as archive:
        archive.write(tif, "sub/scene.tif")
    (tmp_path / "scene.tif.gz").write_bytes(gzip.compress(tif.read_bytes()))
    for i, table in enumerate(("t1", "t2")):
        with rasterio.open(tmp_path / "tables.gpkg", "w", driver="GPKG", RASTER_TABLE=table,
                           **({"APPEND_SUBDATASET": "YES"} if i else {}), **PROFILE) as ds:
            ds.write(np.full((3, 30, 40), i + 1, np.uint8))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_subdatasets_file_is_the_part_of_its_name_that_is_a_file(data):
    """GTIFF_DIR:2:a.tif and HDF4_SDS:UNKNOWN:"a.hdf":0 name their file after another part: the first part
    ("2", "UNKNOWN") was taken for it, so an existing file was said not to exist."""
    assert files.subdataset_file("GTIFF_DIR:2:scene.tif") == "scene.tif"
    assert files.subdataset_file('HDF4_SDS:UNKNOWN:"scene.tif":0') == "scene.tif"
    assert files.subdataset_file(f"GPKG:{data / 'tables.gpkg'}:t1") == str(data / "tables.gpkg")
    assert files.subdataset_file('NETCDF:"nowhere.nc":var') == "nowhere.nc"  # missing: where drivers put it
    assert files.subdataset_file("GPKG:nowhere.gpkg:t1") == "nowhere.gpkg"
    assert files.subdataset_file('NETCDF:"scene.nc:var') is None  # no closing quote: no subdataset name
    assert files.subdataset_file("scene.tif") is None and files.subdataset_file("/vsizip/scene.zip/x.tif") is None


def test_absolute_raster_name_makes_the_file_absolute_and_keeps_the_rest(data):
    zipped, gz, gpkg, tif = (str((data / name).resolve()) for name in ("scene.zip", "scene.tif.gz", "tables.gpkg",
                                                                       "scene.tif"))
    names = {"scene.tif": tif, "./sub/../scene.tif": tif,
             "GPKG:tables.gpkg:t1": f"GPKG:{gpkg}:t1", 'NETCDF:"scene.tif":var': f'NETCDF:"{tif}":var',
             'HDF5:"scene.tif"://group/var': f'HDF5:"{tif}"://group/var', "GTIFF_DIR:2:scene.tif": f"GTIFF_DIR:2:{tif}",
             # An archive in a virtual path: relative, absolute (GDAL's doubled slash), braced, a chain.
             "/vsizip/scene.zip/sub/scene.tif": f"/vsizip/{zipped}/sub/scene.tif",
             f"/vsizip/{zipped}/sub/scene.tif": f"/vsizip/{zipped}/sub/scene.tif",
             "/vsizip/{scene.zip}/sub/scene.tif": f"/vsizip/{{{zipped}}}/sub/scene.tif",
             "/vsigzip/scene.tif.gz": f"/vsigzip/{gz}",
             "/vsizip//vsigzip/scene.tif.gz/x.tif": f"/vsizip//vsigzip/{gz}/x.tif",
             # Nothing here holds it: as given.
             "/vsicurl/https://example.com/a.tif": "/vsicurl/https://example.com/a.tif",
             "/vsizip/missing.zip/a.tif": "/vsizip/missing.zip/a.tif"}
    for name, absolute in names.items():
        assert files.absolute_raster_name(name) == absolute, name
    assert f"/vsizip/{zipped}".startswith("/vsizip//")
    assert files.absolute_raster_name('NETCDF:"nowhere.nc":var') == f'NETCDF:"{data.resolve() / "nowhere.nc"}":var'


def test_raster_file_is_the_file_no_output_may_replace(data):
    assert files.raster_file("scene.tif") == Path("scene.tif")
    assert files.raster_file("GPKG:tables.gpkg:t2") == Path("tables.gpkg")
    assert files.raster_file("GTIFF_DIR:2:scene.tif") == Path("scene.tif")
    # The archive of a member: it was none, as for a remote path.
    assert files.raster_file("/vsizip/scene.zip/sub/scene.tif") == Path("scene.zip")
    assert files.raster_file(f"/vsigzip/{data / 'scene.tif.gz'}") == data / "scene.tif.gz"
    assert files.raster_file("/vsis3/bucket/a.tif") is None and files.raster_file("/vsizip/missing.zip/a.tif") is None


def test_the_feature_cache_reads_names_through_the_same_helper(data):
    """feature_cache had its own copy of the parsing: the file it identifies is the one files.py names."""
    for name in ("scene.tif", "GPKG:tables.gpkg:t1", "/vsizip/scene.zip/sub/scene.tif", "/vsigzip/scene.tif.gz",
                 f"/vsizip/{data / 'scene.zip'}/sub/scene.tif"):
        held = files.held_file(name)
        reads = feature_cache.raster_reads(name)
        assert reads is not None and reads.files[0] == held.file, name
        assert reads.where.replace("{}", str(held.file)) == files.absolute_raster_name(name), name
        with rasterio.open(files.absolute_raster_name(name)) as ds:  # the absolute name opens the same raster
            assert (ds.width, ds.height) == (40, 30), name
    assert not hasattr(feature_cache, "_SUBDATASET") and not hasattr(feature_cache, "ARCHIVE_FILE_SYSTEMS")


def test_segment_opens_a_subdataset_whose_file_is_not_its_first_part(data, tiny_model):
    """GTIFF_DIR:1:scene.tif (the first page of a TIFF) was refused: 'names the file 1, which does not exist'."""
    import json

    from typer.testing import CliRunner

    from backend.service.cli import app

    result = CliRunner().invoke(app, ["segment", "GTIFF_DIR:1:scene.tif", "-c", "water", "-c", "field", "--model",
                                      str(tiny_model), "--out", "out.gpkg", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((data / "out.report.json").read_text())
    assert report["raster"] == f"GTIFF_DIR:1:{(data / 'scene.tif').resolve()}"


def test_the_search_index_is_keyed_by_the_rasters_absolute_gdal_name(data, tiny_model, monkeypatch):
    """The key was Path(raster).resolve(): a subdataset's depended on the working folder (GPKG:a.gpkg:t1 became
    <cwd>/GPKG:a.gpkg:t1, so the same table had one index per folder and per spelling), and /vsizip/a.zip/x.tif
    was one key for every a.zip (each run in another folder rebuilt the other's index)."""
    import json

    from backend.engine.models import load_model
    from backend.engine.search_index import open_index

    loaded = load_model(str(tiny_model), device="cpu")

    def build(name: str) -> tuple[Path, str | None, int]:
        with open_index(name, loaded) as index:
            return index.folder, index.rebuilt_reason, index.ensure().computed

    table, reason, computed = build("GPKG:tables.gpkg:t1")
    assert reason is None and computed > 0
    manifest = json.loads((table / "manifest.json").read_text())
    assert manifest["raster"] == f"GPKG:{(data / 'tables.gpkg').resolve()}:t1"
    elsewhere = data / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("GPKG:../tables.gpkg:t1", f"GPKG:{data / 'tables.gpkg'}:t1"):
        assert build(name) == (table, None, 0), name
    assert build("GPKG:../tables.gpkg:t2")[0] != table
    # One relative archive name in two folders: two rasters, two indexes, each kept.
    for seed, folder in enumerate((data / "a", data / "b")):
        folder.mkdir()
        with zipfile.ZipFile(folder / "tiles.zip", "w") as archive:
            archive.write(write_tif(folder / "tile.tif", seed), "tile.tif")
    member = "/vsizip/tiles.zip/tile.tif"
    monkeypatch.chdir(data / "a")
    first, reason, computed = build(member)
    assert reason is None and computed > 0
    monkeypatch.chdir(data / "b")
    second, reason, computed = build(member)
    assert second != first and reason is None and computed > 0
    monkeypatch.chdir(data / "a")
    assert build(member) == (first, None, 0)
    assert build(f"/vsizip/{data / 'a' / 'tiles.zip'}/tile.tif") == (first, None, 0)


def _cli(*args: str):
    from typer.testing import CliRunner

    from backend.service.cli import app

    return CliRunner().invoke(app, list(args))


def test_index_and_search_take_gdal_names_as_segment_does(data, tiny_model):
    """index and search took RASTER as a pathlib.Path: /vsizip//abs/a.zip/x.tif lost the slash that makes its
    archive absolute (GDAL then found no archive), and a search report recorded GPKG:a.gpkg:t1 as
    <cwd>/GPKG:a.gpkg:t1."""
    import json

    zipped = f"/vsizip/{(data / 'scene.zip').resolve()}/sub/scene.tif"
    assert zipped.startswith("/vsizip//")
    for name, recorded in ((zipped, zipped), ("GPKG:tables.gpkg:t2", f"GPKG:{(data / 'tables.gpkg').resolve()}:t2")):
        indexed = _cli("index", name, "--model", str(tiny_model))
        assert indexed.exit_code == 0, (name, indexed.output)
        assert f"Index of {name}:" in indexed.output
        found = _cli("search", name, "a lake", "--model", str(tiny_model), "--out", "hits.gpkg", "--overwrite",
                     "--quiet")
        assert found.exit_code == 0, (name, found.output)
        assert json.loads((data / "hits.report.json").read_text())["raster"] == recorded
    # The container is an input the hits may not replace.
    over = _cli("search", "GPKG:tables.gpkg:t1", "a lake", "--model", str(tiny_model), "--out", "tables.gpkg",
                "--overwrite")
    assert over.exit_code == 2 and "destroy the input" in over.output, over.output


def test_evaluate_takes_gdal_names_as_segment_does(tmp_path, monkeypatch, tiny_model):
    import json

    from training_data import copy_as_gpkg_table, make_synthetic

    raster, labels, _ = make_synthetic(tmp_path, size=96)
    copy_as_gpkg_table(raster, tmp_path / "scene.gpkg", "scene")
    with zipfile.ZipFile(tmp_path / "scene.zip", "w") as archive:
        archive.write(raster, "scene.tif")
    monkeypatch.chdir(tmp_path)
    zipped = f"/vsizip/{tmp_path / 'scene.zip'}/scene.tif"
    metrics = {}
    for name in ("GPKG:scene.gpkg:scene", zipped, str(raster)):
        result = _cli("evaluate", name, str(labels), "--class-field", "cls", "--model", str(tiny_model), "--json",
                      "metrics.json", "--overwrite", "--quiet")
        assert result.exit_code == 0, (name, result.output)
        assert f"of {name if name != str(raster) else raster.name}" in result.output.splitlines()[0]
        metrics[name] = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["miou"]
    assert len(set(metrics.values())) == 1, metrics  # one raster, three names
    over = _cli("evaluate", "GPKG:scene.gpkg:scene", str(labels), "--class-field", "cls", "--model", str(tiny_model),
                "--json", "scene.gpkg", "--overwrite")
    assert over.exit_code == 2 and "destroy the input" in over.output, over.output
