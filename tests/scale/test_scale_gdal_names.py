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
import pyogrio.raw
import pytest
import rasterio
import rasterio.shutil
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


def placed(origin: float) -> dict:
    """PROFILE with its grid's corner `origin` metres east of PROFILE's."""
    return {**PROFILE, "transform": Affine(2, 0, 500000 + origin, 0, -2, 5000000)}


def test_gdal_names_raster_fields_and_per_raster_files(data):
    """A raster named in GDAL's syntax is in the `raster` field by its absolute name (as `segment` records it),
    and its GeoTIFF in a .vrt output's folder has a portable name beside its file, naming what it reads of it; a
    plain file's names are its path below the folder of all the rasters, as before."""

    from backend.scale.run import raster_files, raster_names

    (data / "sub").mkdir()
    write_zip(data / "sub" / "rel.zip", 1)
    (data / "f.nc").write_bytes(b"")
    (data / "plain.jp2").write_bytes(b"")
    plain = [str(write_tif(data / "plain.tif", 2)), str(write_tif(data / "sub" / "b.tif", 3))]
    assert raster_names(plain) == ["plain.tif", "sub/b.tif"] and raster_files(plain, plans(2)) == raster_names(plain)
    assert raster_names(["sub/b.tif"]) == raster_files(["sub/b.tif"], plans(1)) == ["b.tif"]
    assert raster_files(["plain.tif", "plain.jp2"], plans(2)) == ["plain.tif", "plain_1.tif"]

    paths = ["GPKG:tables.gpkg:t1", "GPKG:tables.gpkg:t2", "/vsizip/sub/rel.zip/sub/scene.tif", 'NETCDF:"f.nc":Band1',
             "plain.tif", "/vsis3/bucket/k.tif"]
    assert raster_names(paths) == [f"GPKG:{data / 'tables.gpkg'}:t1", f"GPKG:{data / 'tables.gpkg'}:t2",
                                   f"/vsizip/{data / 'sub' / 'rel.zip'}/sub/scene.tif",
                                   f'NETCDF:"{data / "f.nc"}":Band1', "plain.tif", "/vsis3/bucket/k.tif"]
    assert raster_files(paths, plans(6)) == ["tables_t1.tif", "tables_t2.tif", "sub/rel_sub_scene.tif",
                                             "f_Band1.tif", "plain.tif", "vsis3_bucket_k.tif"]
    assert raster_names(["GPKG:tables.gpkg:t1"]) == [f"GPKG:{data / 'tables.gpkg'}:t1"]
    # A name the folder holds already takes the raster's input number.
    assert raster_files(["GPKG:tables.gpkg:t1", str(write_tif(data / "tables_t1.tif", 4))], plans(2)) == [
        "tables_t1.tif", "tables_t1_1.tif"]


def plans(count: int) -> list:
    from types import SimpleNamespace

    return [SimpleNamespace(index=i) for i in range(count)]


def test_a_scaled_run_over_gdal_names_writes_portable_raster_files_and_absolute_raster_fields(data, tiny_model):
    """`--workers 2` over two GeoPackage tables, a zipped GeoTIFF in a folder, a netCDF variable (where GDAL
    reads netCDF) and a plain GeoTIFF: the VRT's members are portable GeoTIFFs beside their files that name the
    table, member or variable and each covers its raster; the `raster` field is each GDAL name made absolute."""
    pytest.importorskip("ray")
    tables = data / "tables.gpkg"
    tables.unlink()
    for i, table in enumerate(("t1", "t2")):
        append = {"APPEND_SUBDATASET": "YES"} if i else {}
        with rasterio.open(tables, "w", driver="GPKG", RASTER_TABLE=table, **append, **placed(200 * i)) as ds:
            ds.write(pixels(i))
    (data / "sub").mkdir()
    with rasterio.open(data / "staged.tif", "w", driver="GTiff", **placed(400)) as ds:
        ds.write(pixels(2))
    with zipfile.ZipFile(data / "sub" / "rel.zip", "w") as archive:
        archive.write(data / "staged.tif", "small.tif")
    (data / "staged.tif").unlink()
    with rasterio.open(data / "plain.tif", "w", driver="GTiff", **placed(800)) as ds:
        ds.write(pixels(4))
    inputs = {"GPKG:tables.gpkg:t1": ("tables_t1.tif", 0), "GPKG:tables.gpkg:t2": ("tables_t2.tif", 200),
              "/vsizip/sub/rel.zip/small.tif": ("sub/rel_small.tif", 400), "plain.tif": ("plain.tif", 800)}
    with rasterio.Env() as env:
        has_netcdf = "netCDF" in env.drivers()
    if has_netcdf:
        with rasterio.open(data / "staged.tif", "w", driver="GTiff", **placed(600)) as ds:
            ds.write(pixels(3))
        rasterio.shutil.copy(data / "staged.tif", data / "f.nc", driver="netCDF", FORMAT="NC4")  # Band1..Band3
        (data / "staged.tif").unlink()
        inputs['NETCDF:"f.nc":Band1'] = ("f_Band1.tif", 600)
    result = CliRunner().invoke(app, ["segment", *inputs, *CLASSES, "--model", str(tiny_model), "--workers", "2",
                                      "--out", "w.gpkg", "--class-raster", "w.vrt", "--quiet"])
    assert result.exit_code == 0, result.output

    with rasterio.open(data / "w.vrt") as vrt:
        members = sorted(Path(f).relative_to(data / "w_rasters").as_posix() for f in vrt.files[1:])
    assert members == sorted(file for file, _ in inputs.values())
    assert sorted(p.relative_to(data / "w_rasters").as_posix() for p in (data / "w_rasters").rglob("*.tif")) == members
    assert not any(c in m for m in members for c in ':"*?<>|')
    for file, origin in inputs.values():
        with rasterio.open(data / "w_rasters" / file) as ds:
            expected = rasterio.open(data / "plain.tif").bounds  # every raster is plain.tif's grid, moved
            assert ds.bounds.left == pytest.approx(expected.left - 800 + origin), file
            assert ds.bounds.top == pytest.approx(expected.top) and ds.bounds.bottom == pytest.approx(expected.bottom)
            assert ds.bounds.right - ds.bounds.left == pytest.approx(expected.right - expected.left), file

    meta, _, _, columns = pyogrio.raw.read(data / "w.gpkg", read_geometry=False)
    fields = dict(zip(meta["fields"], columns))
    expected_names = {"GPKG:tables.gpkg:t1": f"GPKG:{tables}:t1", "GPKG:tables.gpkg:t2": f"GPKG:{tables}:t2",
                      "/vsizip/sub/rel.zip/small.tif": f"/vsizip/{data / 'sub' / 'rel.zip'}/small.tif",
                      'NETCDF:"f.nc":Band1': f'NETCDF:"{data / "f.nc"}":Band1', "plain.tif": "plain.tif"}
    assert set(fields["raster"]) == {expected_names[name] for name in inputs}
