"""The search index and the feature cache are never reused for other pixels or another model variant.

A raster or weights file copied over with the same size and mtime (cp + touch, cp -p, rsync -a, tar), a
VRT whose source changed, a mask or .aux.xml added beside a raster, and the same weight bytes loaded
with another activation or precision must each give fresh embeddings; an unchanged rerun still hits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from backend.engine import feature_cache, weights
from backend.engine.feature_cache import FeatureCache, raster_scope
from backend.engine.models import load_model, to_half
from backend.engine.options import SegmentOptions
from backend.engine.raster import open_source
from backend.engine.search_index import open_index
from backend.engine.segment import segment_raster

SIZE = 300  # one level of 2 x 2 windows of 224 px


def write_raster(path: Path, seed: int) -> Path:
    """An uncompressed RGB GeoTIFF: any seed gives a file of the same byte size."""
    rgb = np.random.default_rng(seed).integers(1, 255, (3, SIZE, SIZE), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 2.0, 2.0)) as ds:
        ds.write(rgb)
    return path


def write_vrt(path: Path, source: Path) -> Path:
    """A VRT that reads all of `source` (by a path relative to the VRT)."""
    with rasterio.open(source) as src:
        t, wkt = src.transform, src.crs.to_wkt()
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">'
                    f'{os.path.relpath(source, path.parent)}</SourceFilename><SourceBand>{b}</SourceBand>'
                    '</SimpleSource></VRTRasterBand>' for b in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}"><SRS>{wkt}</SRS><GeoTransform>'
                    f'{t.c},{t.a},{t.b},{t.f},{t.d},{t.e}</GeoTransform>{bands}</VRTDataset>')
    return path


def copy_over(source: Path, target: Path, rename: bool = False) -> None:
    """Put `source`'s bytes at `target` with `target`'s size and mtime, as `cp` + `touch -d` (same inode) or
    an rsync -a / tar extraction (a new file renamed over) do: only the ctime or the inode tells."""
    before = os.stat(target)
    data = source.read_bytes()
    assert len(data) == before.st_size and data != target.read_bytes()
    for _ in range(1000):  # the ctime ticks coarsely: write again until it moved on
        if rename:
            staged = target.with_name(target.name + ".part")
            staged.write_bytes(data)
            os.utime(staged, ns=(before.st_atime_ns, before.st_mtime_ns))
            os.replace(staged, target)
        else:
            with open(target, "r+b") as fh:
                fh.write(data)
            os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(target)
        if after.st_ctime_ns != before.st_ctime_ns or after.st_ino != before.st_ino:
            break
        time.sleep(0.001)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert target.read_bytes() == data


def embeddings(raster: Path, loaded) -> tuple[np.ndarray, str | None, int]:
    """The index's embeddings of the whole raster, why it was rebuilt, and how many windows were computed."""
    with open_index(raster, loaded) as index:
        stats = index.ensure()
        return index.entries().embeddings, index.rebuilt_reason, stats.computed


@pytest.fixture
def loaded(tiny_model, tmp_path):
    copy = tmp_path / "models" / "mine.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(tiny_model, copy)
    return load_model(str(copy), device="cpu")


@pytest.mark.parametrize("rename", [False, True], ids=["copied-in-place", "renamed-over"])
def test_raster_replaced_with_the_same_size_and_mtime_gets_a_fresh_index(loaded, tmp_path, rename):
    raster = write_raster(tmp_path / "tile.tif", seed=0)
    other = write_raster(tmp_path / "other.tif", seed=1)
    old, _, _ = embeddings(raster, loaded)
    _, reason, computed = embeddings(raster, loaded)
    assert reason is None and computed == 0  # an unchanged raster keeps its index
    copy_over(other, raster, rename)
    new, reason, computed = embeddings(raster, loaded)
    assert reason is not None and "rebuilt" in reason and computed == len(new)
    fresh, _, _ = embeddings(other, loaded)
    np.testing.assert_array_equal(new, fresh)
    assert not np.allclose(new, old, atol=1e-2)


@pytest.mark.parametrize("rename", [False, True], ids=["copied-in-place", "renamed-over"])
def test_weights_replaced_with_the_same_size_and_mtime_are_hashed_again(tmp_path, rename):
    path = tmp_path / "model.bin"
    path.write_bytes(b"a" * 4096)
    assert weights.file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert weights.file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()  # remembered
    retrained = tmp_path / "retrained.bin"
    retrained.write_bytes(b"b" * 4096)
    copy_over(retrained, path, rename)
    assert weights.file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()
    assert weights.files_sha256([path, retrained]) == [hashlib.sha256(b"b" * 4096).hexdigest()] * 2


def test_weights_file_copied_over_gives_the_new_weights_id(tiny_model, tmp_path):
    from tinymodels import make_tiny_clip, save_safetensors

    path = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_model, path)
    first = load_model(str(path)).weights_id
    other = save_safetensors(make_tiny_clip(seed=1), tmp_path / "other.safetensors")
    copy_over(other, path)
    assert load_model(str(path)).weights_id == hashlib.sha256(other.read_bytes()).hexdigest() != first


@pytest.mark.parametrize("nested", [False, True], ids=["vrt", "vrt-of-vrt"])
def test_vrt_whose_source_changed_gets_a_fresh_index(loaded, tmp_path, nested):
    (tmp_path / "tiles").mkdir()
    source = write_raster(tmp_path / "tiles" / "src.tif", seed=0)
    vrt = write_vrt(tmp_path / "mosaic.vrt", source)
    if nested:
        vrt = write_vrt(tmp_path / "outer.vrt", vrt)
    old, _, _ = embeddings(vrt, loaded)
    assert embeddings(vrt, loaded)[1:] == (None, 0)
    vrt_bytes = vrt.read_bytes()
    write_raster(source, seed=1)  # new pixels under the same VRT file
    assert vrt.read_bytes() == vrt_bytes
    new, reason, computed = embeddings(vrt, loaded)
    assert reason is not None and computed == len(new)
    np.testing.assert_array_equal(new, embeddings(source, loaded)[0])
    assert not np.allclose(new, old, atol=1e-2)


def test_large_vrt_sources_are_told_apart_by_stat_without_being_read(loaded, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "COMPANION_HASH_MAX", 0, raising=False)  # every source counts as large
    source = write_raster(tmp_path / "src.tif", seed=0)
    vrt = write_vrt(tmp_path / "mosaic.vrt", source)
    embeddings(vrt, loaded)
    hashed: list[Path] = []
    real = getattr(weights, "files_sha256", None)
    monkeypatch.setattr(feature_cache, "files_sha256", lambda files: hashed.extend(files) or real(files),
                        raising=False)
    assert embeddings(vrt, loaded)[1:] == (None, 0)
    assert hashed == [vrt.resolve()]  # the source is identified by its stat, not its bytes
    copy_over(write_raster(tmp_path / "other.tif", seed=1), source)
    assert embeddings(vrt, loaded)[1] is not None


def add_mask(raster: Path) -> None:
    """An external .msk that hides all but the bottom 40 rows."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[260:] = 255
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(raster, "r+") as ds:
        ds.write_mask(mask)
    assert Path(str(raster) + ".msk").is_file()


def add_aux_nodata(raster: Path) -> None:
    """A .aux.xml that declares 7 nodata on every band: pixels of value 7 become invalid."""
    bands = "".join(f'<PAMRasterBand band="{b}"><NoDataValue>7</NoDataValue></PAMRasterBand>' for b in (1, 2, 3))
    Path(str(raster) + ".aux.xml").write_text(f"<PAMDataset>{bands}</PAMDataset>")


@pytest.mark.parametrize("sidecar", [add_mask, add_aux_nodata], ids=["msk", "aux.xml"])
def test_a_sidecar_added_beside_the_raster_gets_a_fresh_index_and_feature_scope(loaded, tmp_path, sidecar):
    raster = write_raster(tmp_path / "t.tif", seed=0)
    tif_bytes = raster.read_bytes()
    embeddings(raster, loaded)
    with open_source(raster) as source:
        scope = raster_scope(source, loaded, "segearth", "torch")
    sidecar(raster)
    assert raster.read_bytes() == tif_bytes
    with open_source(raster) as source:
        assert raster_scope(source, loaded, "segearth", "torch") != scope
    _, reason, _ = embeddings(raster, loaded)
    assert reason is not None and "rebuilt" in reason
    assert embeddings(raster, loaded)[1:] == (None, 0)


def test_mask_added_leaves_no_hit_on_masked_windows(loaded, tmp_path):
    raster = write_raster(tmp_path / "t.tif", seed=0)
    with open_index(raster, loaded) as index:
        index.ensure()
        assert len(index.entries().embeddings) == 4
    add_mask(raster)
    with open_index(raster, loaded) as index:
        stats = index.ensure()
        assert stats.empty == 2 and len(index.entries().embeddings) == 2  # the top windows are all masked


def test_same_weights_with_another_activation_or_precision_get_their_own_index(loaded, tiny_model, tmp_path):
    """RS-M-CLIP.safetensors is a registry file name: the same bytes load with GELU instead of QuickGELU."""
    gelu_path = tmp_path / "models" / "RS-M-CLIP.safetensors"
    shutil.copyfile(tiny_model, gelu_path)
    gelu = load_model(str(gelu_path), device="cpu")
    assert gelu.weights_id == loaded.weights_id and gelu.metadata["activation"] != loaded.metadata["activation"]
    raster = write_raster(tmp_path / "t.tif", seed=0)
    quick_embeddings, _, _ = embeddings(raster, loaded)
    with open_index(raster, loaded) as quick_index, open_index(raster, gelu) as gelu_index:
        assert gelu_index.folder != quick_index.folder and gelu_index.missing() == gelu_index.window_count()
    gelu_embeddings, _, computed = embeddings(raster, gelu)
    assert computed == len(gelu_embeddings) and not np.allclose(gelu_embeddings, quick_embeddings, atol=1e-3)
    half = to_half(load_model(str(tmp_path / "models" / "mine.safetensors"), device="cpu"))
    with open_index(raster, half) as half_index, open_index(raster, loaded) as quick_index:
        assert half_index.folder != quick_index.folder and half_index.missing() == half_index.window_count()
    with open_source(raster) as source:
        scopes = {raster_scope(source, model, "segearth", "torch") for model in (loaded, gelu, half)}
        assert len(scopes) == 3


def segment(raster: Path, loaded, out: Path, cache: FeatureCache | None):
    options = SegmentOptions(raster=raster, class_lines=["water", "road"], runtime="torch", out=out / "result.gpkg",
                             prob_raster=out / "probs.tif", region_checks=False)
    out.mkdir()
    result = segment_raster(options, loaded, feature_cache=cache)
    with rasterio.open(out / "probs.tif") as ds:
        return result, ds.read()


def test_feature_cache_is_not_reused_after_a_vrt_source_or_a_raster_was_copied_over(loaded, tmp_path):
    source = write_raster(tmp_path / "src.tif", seed=0)
    vrt = write_vrt(tmp_path / "mosaic.vrt", source)
    cache = FeatureCache(max_bytes=64 * 2**20)
    segment(vrt, loaded, tmp_path / "first", cache)
    rerun, _ = segment(vrt, loaded, tmp_path / "rerun", cache)
    assert rerun.features["cached"] == rerun.tiles and rerun.features["encoded"] == 0
    write_raster(source, seed=1)
    changed, probs = segment(vrt, loaded, tmp_path / "changed", cache)
    assert changed.features["cached"] == 0
    _, uncached = segment(vrt, loaded, tmp_path / "uncached", None)
    np.testing.assert_array_equal(probs, uncached)
    copy_over(write_raster(tmp_path / "other.tif", seed=2), source)
    copied, probs = segment(source, loaded, tmp_path / "copied", cache)
    assert copied.features["cached"] == 0
    np.testing.assert_array_equal(probs, segment(source, loaded, tmp_path / "copied-uncached", None)[1])


def test_segment_feature_cache_is_not_shared_across_activations(loaded, tiny_model, tmp_path):
    gelu_path = tmp_path / "models" / "RS-M-CLIP.safetensors"
    shutil.copyfile(tiny_model, gelu_path)
    gelu = load_model(str(gelu_path), device="cpu")
    raster = write_raster(tmp_path / "t.tif", seed=0)
    cache = FeatureCache(max_bytes=64 * 2**20)
    segment(raster, loaded, tmp_path / "quick", cache)
    cached, probs = segment(raster, gelu, tmp_path / "gelu", cache)
    _, uncached = segment(raster, gelu, tmp_path / "gelu-uncached", None)
    assert cached.features["cached"] == 0
    np.testing.assert_array_equal(probs, uncached)


def test_raster_files_name_what_gdal_reads(tmp_path):
    (tmp_path / "tiles").mkdir()
    source = write_raster(tmp_path / "tiles" / "src.tif", seed=0)
    with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(source, "r+") as ds:  # external overviews: src.tif.ovr
        ds.build_overviews([2])
    add_mask(source)
    inner = write_vrt(tmp_path / "inner.vrt", source)
    outer = write_vrt(tmp_path / "outer.vrt", inner)
    files = feature_cache.raster_files(outer)
    assert files is not None and files[0] == outer.resolve()
    assert set(files) == {outer.resolve(), inner.resolve(), source.resolve(),
                          Path(str(source.resolve()) + ".ovr"), Path(str(source.resolve()) + ".msk")}
    assert feature_cache.raster_files("/vsimem/x.tif") is None
