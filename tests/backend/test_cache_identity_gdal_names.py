"""Rasters read through a GDAL name are cached by the file on this machine that holds them.

A member of a local archive (/vsizip/, /vsitar/, /vsigzip/) is known by the archive's sha256 and the member's
name, a subdataset (GPKG:a.gpkg:table, NETCDF:"a.nc":var) by its container's and its name, also as the source
of a VRT (the plugin reads layers through one). A rewritten archive or container is another raster; a remote
virtual path (/vsicurl/, /vsis3/ ...) or a name whose file cannot be told is still never cached.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine import feature_cache
from backend.engine.feature_cache import raster_files, raster_identity, raster_reads
from backend.engine.models import load_model
from backend.engine.search_index import open_index
from backend.service.cli import app

SIZE = 300
PROFILE = dict(width=SIZE, height=SIZE, count=3, dtype="uint8", crs="EPSG:32633",
               transform=from_origin(500000, 5000000, 2.0, 2.0))


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, (3, SIZE, SIZE), dtype=np.uint8)


def write_tif(path: Path, seed: int) -> Path:
    with rasterio.open(path, "w", driver="GTiff", **PROFILE) as ds:
        ds.write(pixels(seed))
    return path


def write_zip(path: Path, seed: int, members=("sub/tile.tif",)) -> Path:
    """An archive of GeoTIFFs (member i holds the pixels of seed + i), written anew."""
    with zipfile.ZipFile(path, "w") as archive:
        for i, member in enumerate(members):
            archive.write(write_tif(path.with_name(f"staged-{i}.tif"), seed + i), member)
    return path


def write_tar(path: Path, seed: int) -> Path:
    with tarfile.open(path, "w") as archive:
        archive.add(write_tif(path.with_name("staged.tif"), seed), "tile.tif")
    return path


def write_gzip(path: Path, seed: int) -> Path:
    with gzip.open(path, "wb") as out:
        out.write(write_tif(path.with_name("staged.tif"), seed).read_bytes())
    return path


def write_gpkg(path: Path, seed: int) -> Path:
    """A GeoPackage with two raster tables, t1 (pixels of `seed`) and t2 (of seed + 1), written anew."""
    path.unlink(missing_ok=True)
    with rasterio.open(path, "w", driver="GPKG", RASTER_TABLE="t1", **PROFILE) as ds:
        ds.write(pixels(seed))
    with rasterio.open(path, "w", driver="GPKG", RASTER_TABLE="t2", APPEND_SUBDATASET="YES", **PROFILE) as ds:
        ds.write(pixels(seed + 1))
    return path


def write_vrt(path: Path, source: str, relative: bool = False) -> Path:
    """A VRT reading all of the raster GDAL opens as `source`."""
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT='
                    f'"{int(relative)}">{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
                    '</VRTRasterBand>' for b in (1, 2, 3))
    t = PROFILE["transform"]
    path.write_text(f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><SRS>EPSG:32633</SRS><GeoTransform>'
                    f'{t.c},{t.a},{t.b},{t.f},{t.d},{t.e}</GeoTransform>{bands}</VRTDataset>')
    return path


def identity(name: str) -> dict | None:
    """The identity of `name`, alone and with the dataset GDAL opened (which must agree)."""
    alone = raster_identity(name)
    with rasterio.open(name) as ds:
        assert raster_identity(name, ds) == alone
    return alone


ARCHIVES = {"zip": ("tile.zip", "/vsizip/{}/sub/tile.tif", write_zip),
            "tar": ("tile.tar", "/vsitar/{}/tile.tif", write_tar),
            "gzip": ("tile.tif.gz", "/vsigzip/{}", write_gzip)}


@pytest.mark.parametrize("kind", list(ARCHIVES))
def test_archive_member_is_known_by_its_archive(tmp_path, monkeypatch, kind):
    file, where, write = ARCHIVES[kind]
    archive = write(tmp_path / file, seed=0)
    monkeypatch.chdir(tmp_path)
    name = where.format(archive.name)
    first = identity(name)
    assert first is not None and first == identity(name)
    assert first["file"] == str(archive.resolve()) and first["name"] == where
    # The archive by its absolute path (/vsizip//abs/a.zip/x.tif) is the same raster.
    assert identity(where.format(str(archive.resolve()))) == first
    assert raster_reads(name).files == [archive.resolve()]
    assert raster_files(name) is None  # a list of files cannot tell the archive's members apart
    write(archive, seed=1)
    with rasterio.open(name) as ds:
        assert np.array_equal(ds.read(), pixels(1))
    assert identity(name) != first


def test_archive_members_and_braced_archive_names(tmp_path, monkeypatch):
    archive = write_zip(tmp_path / "tiles.zip", seed=0, members=("a.tif", "b.tif"))
    monkeypatch.chdir(tmp_path)
    a, b = identity("/vsizip/tiles.zip/a.tif"), identity("/vsizip/tiles.zip/b.tif")
    assert a is not None and b is not None and a != b and a["sha256"] == b["sha256"]
    braced = identity(f"/vsizip/{{{archive}}}/a.tif")
    assert braced is not None and braced["file"] == a["file"] and braced["sha256"] == a["sha256"]


@pytest.mark.parametrize("name", [
    "/vsicurl/https://example.com/tile.tif", "/vsis3/bucket/tile.tif", "/vsimem/tile.tif",
    "/vsizip//vsicurl/https://example.com/tiles.zip/tile.tif", "/vsizip/{/vsis3/bucket/tiles.zip}/tile.tif",
    "/vsizip/missing.zip/tile.tif", "GPKG:missing.gpkg:t1", "ZARR:\"folder.zarr\":/var",
])
def test_names_over_no_file_here_are_never_identified(tmp_path, monkeypatch, name):
    (tmp_path / "folder.zarr").mkdir()
    monkeypatch.chdir(tmp_path)
    assert raster_reads(name) is None and raster_identity(name) is None and raster_files(name) is None


def test_subdataset_is_known_by_its_container_and_name(tmp_path, monkeypatch):
    gpkg = write_gpkg(tmp_path / "layers.gpkg", seed=0)
    monkeypatch.chdir(tmp_path)
    t1, t2 = identity("GPKG:layers.gpkg:t1"), identity("GPKG:layers.gpkg:t2")
    assert t1 is not None and t1 == identity(f"GPKG:{gpkg}:t1") == identity("GPKG:layers.gpkg:t1")
    assert t1["file"] == str(gpkg) and t1["name"] == "GPKG:{}:t1" and t2["name"] == "GPKG:{}:t2"
    assert t1["sha256"] == t2["sha256"] and t1 != t2
    assert raster_files("GPKG:layers.gpkg:t1") is None
    write_gpkg(gpkg, seed=5)
    assert identity("GPKG:layers.gpkg:t1") != t1
    # The quoted forms of other drivers name their file the same way.
    assert feature_cache._held('NETCDF:"layers.gpkg":var') == (gpkg, 'NETCDF:"{}":var')
    assert feature_cache._held(f'HDF5:"{gpkg}"://group/var') == (gpkg, 'HDF5:"{}"://group/var')
    assert feature_cache._held("GTIFF_DIR:2:layers.gpkg") == (gpkg, "GTIFF_DIR:2:{}")


def test_geopackage_edits_still_in_its_write_ahead_log_are_another_raster(tmp_path):
    gpkg = write_gpkg(tmp_path / "layers.gpkg", seed=0)
    name = f"GPKG:{gpkg}:t1"
    editor = sqlite3.connect(gpkg)  # as QGIS edits a GeoPackage: in WAL mode, the edits beside it until closed
    try:
        assert editor.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
        before = identity(name)
        main = gpkg.read_bytes()
        editor.execute("UPDATE t1 SET tile_data = (SELECT tile_data FROM t2 WHERE t2.tile_row = t1.tile_row "
                       "AND t2.tile_column = t1.tile_column AND t2.zoom_level = t1.zoom_level)")
        editor.commit()
        wal = Path(f"{gpkg}-wal")
        assert gpkg.read_bytes() == main and wal.stat().st_size > 0  # the edit is in the log alone
        edited = raster_identity(name)
        assert edited != before and [c["file"] for c in edited["companions"]] == [str(wal)]
        with rasterio.open(name) as ds, rasterio.open(f"GPKG:{gpkg}:t2") as t2:
            assert np.array_equal(ds.read(), t2.read())  # which GDAL reads
        assert identity(name) != before
    finally:
        editor.close()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative-to-vrt"])
def test_vrt_sources_in_archives_and_geopackages_count(tmp_path, relative):
    data = tmp_path / "data"
    data.mkdir()
    archive = write_zip(data / "tiles.zip", seed=0)
    gpkg = write_gpkg(data / "layers.gpkg", seed=2)
    zipped = write_vrt(data / "zipped.vrt", f"/vsizip/{archive}/sub/tile.tif")
    table = write_vrt(data / "table.vrt", "GPKG:layers.gpkg:t1" if relative else f"GPKG:{gpkg}:t1", relative)
    outer = write_vrt(tmp_path / "outer.vrt", "data/table.vrt", relative=True)
    assert raster_files(zipped) == [zipped.resolve(), archive.resolve()]
    assert raster_files(outer) == [outer.resolve(), table.resolve(), gpkg.resolve()]
    before = {vrt: identity(str(vrt)) for vrt in (zipped, table, outer)}
    write_zip(archive, seed=1)
    write_gpkg(gpkg, seed=3)
    after = {vrt: identity(str(vrt)) for vrt in (zipped, table, outer)}
    assert all(after[vrt] is not None and after[vrt] != before[vrt] for vrt in before)
    remote = write_vrt(tmp_path / "remote.vrt", "/vsizip//vsicurl/https://example.com/tiles.zip/tile.tif")
    assert raster_identity(remote) is None and raster_files(remote) is None


def test_vrt_inside_an_archive_reads_its_sources_outside(tmp_path, monkeypatch):
    source = write_tif(tmp_path / "outside.tif", seed=0)
    vrt = write_vrt(tmp_path / "staged.vrt", str(source))
    with zipfile.ZipFile(tmp_path / "mosaic.zip", "w") as archive:
        archive.write(vrt, "mosaic.vrt")
    monkeypatch.chdir(tmp_path)
    name = "/vsizip/mosaic.zip/mosaic.vrt"
    assert raster_reads(name).files == [(tmp_path / "mosaic.zip").resolve(), source.resolve()]
    before = identity(name)
    write_tif(source, seed=1)
    assert identity(name) != before


# -- the command line and the search index, end to end


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("m") / "tiny.pt")


def segment(name: str, model: Path, classes: list[str], out: Path) -> tuple[str, dict]:
    args = ["segment", name, "--model", str(model), "--cache-features", "--overwrite", "-o", str(out)]
    result = CliRunner().invoke(app, [*args, *(arg for c in classes for arg in ("-c", c))])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(re.search(r"report: (\S+)", result.output)[1]).read_text())
    return result.output, report


@pytest.mark.parametrize("kind", ["vsizip", "vrt-of-gpkg"])
def test_cli_rerun_with_other_classes_reuses_the_features(tmp_path, monkeypatch, model, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "vsizip":
        archive, name = write_zip(tmp_path / "tile.zip", seed=0), "/vsizip/tile.zip/sub/tile.tif"

        def change():
            write_zip(archive, seed=1)
    else:  # as the plugin sends a GeoPackage layer: through a VRT that names the table
        gpkg = write_gpkg(tmp_path / "layers.gpkg", seed=0)
        name = str(write_vrt(tmp_path / "layer.vrt", f"GPKG:{gpkg}:t1"))

        def change():
            write_gpkg(gpkg, seed=1)
    output, first = segment(name, model, ["water", "road"], tmp_path / "a.gpkg")
    assert "cached" not in output and first["features"]["cached"] == 0
    output, second = segment(name, model, ["forest", "shed"], tmp_path / "b.gpkg")
    assert second["features"]["cached"] == second["tiles"] > 0 and second["features"]["encoded"] == 0
    assert f"features of {second['tiles']} cached" in output
    change()
    output, changed = segment(name, model, ["forest", "shed"], tmp_path / "c.gpkg")
    assert "cached" not in output and changed["features"]["cached"] == 0


def test_search_index_of_an_archive_member_is_reused_until_the_archive_changes(tmp_path, monkeypatch, model):
    loaded = load_model(str(model), device="cpu")
    archive = write_zip(tmp_path / "tile.zip", seed=0)
    monkeypatch.chdir(tmp_path)
    name = "/vsizip/tile.zip/sub/tile.tif"

    def build():
        with open_index(name, loaded) as index:
            stats = index.ensure()
            return index.rebuilt_reason, stats.computed

    reason, computed = build()
    assert reason is None and computed > 0
    assert build() == (None, 0)
    write_zip(archive, seed=1)
    reason, computed = build()
    assert reason is not None and "changed" in reason and computed > 0
