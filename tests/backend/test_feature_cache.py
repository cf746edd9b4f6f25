"""Re-runs with new classes reuse the image features: same output as an uncached run, bounded memory and disk."""

from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
from rasterio.transform import from_origin
from tinymodels import make_tiny_clip, save_plain
from typer.testing import CliRunner

from backend.engine.feature_cache import FeatureCache
from backend.engine.models import load_model
from backend.engine.options import SegmentOptions
from backend.engine.segment import segment_raster
from backend.service.cli import app

FIRST = ["water, lake", "cropland", "road"]
SECOND = ["building, roof", "forest", "shed"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("m") / "tiny.pt")))


def write_raster(path: Path, seed: int = 0, size: int = 400) -> Path:
    rgb = np.random.default_rng(seed).integers(0, 255, (3, size, size), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 2.0, 2.0)) as ds:
        ds.write(rgb)
    return path


def run(raster, loaded, classes, out: Path, cache=None, bbox=None):
    options = SegmentOptions(raster=raster, class_lines=classes, bbox=bbox, runtime="torch", out=out / "result.gpkg",
                             class_raster=out / "classes.tif", prob_raster=out / "probs.tif")
    out.mkdir()
    return segment_raster(options, loaded, feature_cache=cache)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read()


def test_rerun_with_new_classes_skips_the_encoder_and_writes_what_an_uncached_run_writes(loaded, tmp_path):
    raster = write_raster(tmp_path / "image.tif")
    cache = FeatureCache(max_bytes=64 * 2**20)
    first = run(raster, loaded, FIRST, tmp_path / "first", cache)
    assert first.features["cached"] == 0 and first.features["encoded"] == first.tiles
    cached = run(raster, loaded, SECOND, tmp_path / "cached", cache)
    assert cached.features["cached"] == cached.tiles and cached.features["encoded"] == 0
    uncached = run(raster, loaded, SECOND, tmp_path / "uncached")
    assert np.array_equal(read(tmp_path / "cached" / "classes.tif"), read(tmp_path / "uncached" / "classes.tif"))
    np.testing.assert_array_equal(read(tmp_path / "cached" / "probs.tif"), read(tmp_path / "uncached" / "probs.tif"))
    assert cached.classes == uncached.classes
    assert cached.report["features"]["cache"]["memory_bytes"] <= 64 * 2**20


def test_an_overlapping_extent_reuses_the_crops_it_shares(loaded, tmp_path):
    raster = write_raster(tmp_path / "image.tif", size=800)
    cache = FeatureCache()
    run(raster, loaded, FIRST, tmp_path / "left", cache, bbox=(500000, 4999700, 500300, 5000000))
    shifted = run(raster, loaded, SECOND, tmp_path / "shifted", cache, bbox=(500200, 4999700, 500800, 5000000))
    assert 0 < shifted.features["cached"] < shifted.tiles
    assert shifted.features["encoded"] > 0


def test_a_rewritten_raster_is_not_served_stale_features(loaded, tmp_path):
    raster = write_raster(tmp_path / "image.tif", seed=0)
    cache = FeatureCache()
    run(raster, loaded, FIRST, tmp_path / "before", cache)
    write_raster(raster, seed=1)
    after = run(raster, loaded, FIRST, tmp_path / "after", cache)
    assert after.features["cached"] == 0


def test_a_raster_renamed_over_during_a_run_keys_the_pixels_the_run_read(loaded, tmp_path, monkeypatch):
    """A re-export renamed over the raster while a run prepared its model: the run read the old file, and its
    features were kept under the new file's sha256, so every later run of the new file got the old pixels'."""
    import os

    from backend.engine import segment

    raster = write_raster(tmp_path / "image.tif", seed=0)
    newer = write_raster(tmp_path / "newer.tif", seed=1)
    real = segment.make_encoder

    def swapping(*args, **kwargs):
        os.replace(newer, raster)
        return real(*args, **kwargs)

    cache = FeatureCache()
    monkeypatch.setattr(segment, "make_encoder", swapping)
    run(raster, loaded, FIRST, tmp_path / "during", cache)
    monkeypatch.setattr(segment, "make_encoder", real)
    after = run(raster, loaded, SECOND, tmp_path / "after", cache)
    assert after.features["cached"] == 0
    run(raster, loaded, SECOND, tmp_path / "uncached")
    np.testing.assert_array_equal(read(tmp_path / "after" / "probs.tif"), read(tmp_path / "uncached" / "probs.tif"))


def test_a_raster_renamed_over_as_it_is_opened_gets_no_key(tmp_path):
    import contextlib
    import os

    from backend.engine.feature_cache import opened_raster_identity, raster_identity
    from backend.engine.raster import open_source

    raster = write_raster(tmp_path / "image.tif", seed=0)
    newer = write_raster(tmp_path / "newer.tif", seed=1)
    with contextlib.ExitStack() as stack:
        source, identity = opened_raster_identity(raster, lambda: stack.enter_context(open_source(raster)))
        assert identity == raster_identity(raster) is not None

        def swapped_after_opening():
            opened = stack.enter_context(open_source(raster))
            os.replace(newer, raster)
            return opened

        source, identity = opened_raster_identity(raster, swapped_after_opening)
        assert identity is None and source.dataset is not None


def test_a_resampled_float_raster_cached_over_another_extent_writes_what_an_uncached_run_writes(loaded, tmp_path):
    """Resampled, a crop's pixels depend on the strip read around it, whose columns follow the extent: crops a run
    over another extent cached gave float32 rasters features that an uncached run does not compute."""
    raster = tmp_path / "f32.tif"
    data = (np.random.default_rng(3).random((3, 300, 700)) * 3000).astype("float32")
    with rasterio.open(raster, "w", driver="GTiff", width=700, height=300, count=3, dtype="float32",
                       crs="EPSG:32633", transform=from_origin(500000, 5000000, 2.0, 2.0)) as ds:
        ds.write(data)
    left, right = (500000, 4999400, 500600, 5000000), (500400, 4999400, 501400, 5000000)

    def run_scaled(name: str, bbox, cache=None):
        (tmp_path / name).mkdir()
        options = SegmentOptions(raster=raster, class_lines=SECOND, runtime="torch", scale=1.3, bbox=bbox,
                                 region_checks=False, out=tmp_path / name / "r.gpkg",
                                 prob_raster=tmp_path / name / "p.tif")
        return segment_raster(options, loaded, feature_cache=cache)

    cache = FeatureCache()
    run_scaled("left", left, cache)
    run_scaled("right", right, cache)
    run_scaled("uncached", right)
    np.testing.assert_array_equal(read(tmp_path / "right" / "p.tif"), read(tmp_path / "uncached" / "p.tif"))
    assert run_scaled("again", right, cache).features["encoded"] == 0  # the same extent again: all cached


def test_memory_is_bounded_and_the_least_recently_used_crop_goes_first():
    cache = FeatureCache(max_bytes=3 * 14 * 14 * 64 * 4)
    crops = [(0, i * 112, 224, 224) for i in range(4)]
    for crop in crops[:3]:
        cache.put("scope", crop, np.full((14, 14, 64), crop[1], np.float32))
    assert cache.get("scope", crops[0]) is not None  # now the most recently used
    cache.put("scope", crops[3], np.zeros((14, 14, 64), np.float32))
    stats = cache.stats()
    assert stats["entries"] == 3 and stats["memory_bytes"] <= stats["memory_max_bytes"]
    assert cache.get("scope", crops[1]) is None
    assert cache.get("scope", crops[0])[0, 0, 0] == 0.0 and cache.get("scope", crops[2])[0, 0, 0] == 224


def test_disk_tier_survives_a_new_cache_and_stays_within_its_budget(tmp_path):
    entry = np.ones((14, 14, 64), np.float32)
    budget = 3 * (entry.nbytes + 200)
    cache = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
    for i in range(5):
        cache.put("scope", (0, i, 224, 224), entry * i)
    files = list(tmp_path.glob("*/*.npy"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= budget
    reopened = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
    assert reopened.get("scope", (0, 0, 224, 224)) is None
    np.testing.assert_array_equal(reopened.get("scope", (0, 4, 224, 224)), entry * 4)
    assert reopened.stats()["disk_bytes"] <= budget


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.npy") if not path.name.startswith("."))


def test_entries_of_a_scope_with_a_separator_are_counted_and_trimmed_by_later_caches(tmp_path):
    """A GPU run's fp16 region checks were kept one folder deeper than the scan looks: never counted, never trimmed,
    so the folder grew past its budget run after run."""
    entry = np.ones(512, np.float32)
    budget = 3 * (entry.nbytes + 200)
    for run_number in range(4):  # four later runs, each a new cache over the folder
        cache = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
        for i in range(3):
            cache.put("digest/fp16", (run_number, i, 224, 224), entry * i)
    assert folder_bytes(tmp_path) <= budget
    reopened = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
    assert reopened.stats()["disk_bytes"] == folder_bytes(tmp_path) > 0
    np.testing.assert_array_equal(reopened.get("digest/fp16", (3, 2, 224, 224)), entry * 2)


def test_a_folder_that_a_server_and_command_line_runs_share_stays_within_the_budget(tmp_path):
    entry = np.ones(1000, np.float32)
    budget = 20 * (entry.nbytes + 200)
    server = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)  # listed the folder empty
    for i in range(30):
        FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget).put("s", (0, i, 224, 224), entry)
    for i in range(30):
        server.put("s", (1, i, 224, 224), entry)
    assert folder_bytes(tmp_path) <= budget * 1.2
    assert server.stats()["disk_bytes"] == folder_bytes(tmp_path)
    assert server.get("s", (1, 29, 224, 224)) is not None  # its own newest entries stay


def test_a_shared_folder_gives_up_its_least_recently_used_entries_whoever_wrote_them(tmp_path):
    """The server's own earlier listing went to the back of the queue at each listing, so the entries command-line
    runs had just written were the first to go."""
    import os
    import time

    entry = np.ones(1000, np.float32)
    budget = 20 * (entry.nbytes + 200)
    old = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
    for i in range(10):
        old.put("s", (0, i, 224, 224), entry)
    week_ago = time.time() - 7 * 86400
    for path in tmp_path.glob("*/*.npy"):
        os.utime(path, (week_ago, week_ago))
    server = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)  # lists the week-old entries
    cli = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=budget)
    for i in range(10):
        cli.put("s", (1, i, 224, 224), entry)
    for i in range(8):  # 28 entries for a budget of 20: 8 go, the week-old ones
        server.put("s", (2, i, 224, 224), entry)
    assert all(cli.get("s", (1, i, 224, 224)) is not None for i in range(10))
    assert sum(old.get("s", (0, i, 224, 224)) is not None for i in range(10)) <= 2
    assert folder_bytes(tmp_path) <= budget * 1.2


def test_staged_entries_of_a_killed_process_are_swept_and_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from backend.engine.temporary import host_mark, new_run_tag, staged_path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    scope = tmp_path / "scope"
    scope.mkdir()
    np.save(scope / "0_0_224_224.npy", np.ones(4, np.float32))
    dead = staged_path(scope / "0_112_224_224.npy", f"{dead_pid}h{host_mark()}-0123456789ab")
    live = staged_path(scope / "0_224_224_224.npy", new_run_tag())
    for path in (dead, live):
        path.write_bytes(b"half a crop")
    cache = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=2**20)
    assert not dead.exists() and live.exists()
    assert cache.stats()["disk_bytes"] == (scope / "0_0_224_224.npy").stat().st_size


def test_a_server_reports_crops_its_disk_tier_served_as_hits(tmp_path):
    from backend.engine.feature_cache import feature_cache_for

    shared = FeatureCache(max_bytes=2**20)  # a server's memory cache, no disk tier of its own
    FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=2**20).put("s", (0, 0, 224, 224),
                                                                         np.ones(8, np.float32))
    shared.home = tmp_path
    job = feature_cache_for(True, 1, shared)
    assert job is not None and job.get("s", (0, 0, 224, 224)) is not None
    assert job.get("s", (0, 112, 224, 224)) is None
    assert (job.stats()["hits"], job.stats()["misses"]) == (1, 1)
    assert (shared.stats()["hits"], shared.stats()["misses"]) == (1, 1)


def test_cli_cache_features_makes_the_second_run_skip_the_encoder(loaded, tmp_path):
    model = tmp_path / "tiny.pt"
    save_plain(make_tiny_clip(16), model)
    raster = write_raster(tmp_path / "image.tif")
    runner = CliRunner()
    args = ["segment", str(raster), "--model", str(model), "--cache-features", "--overwrite"]
    first = runner.invoke(app, [*args, "-c", "water", "-c", "road", "-o", str(tmp_path / "a.gpkg")])
    assert first.exit_code == 0, first.output
    assert "cached" not in first.output
    second = runner.invoke(app, [*args, "-c", "forest", "-c", "shed", "-o", str(tmp_path / "b.gpkg")])
    assert second.exit_code == 0, second.output
    assert "features of 9 cached" in second.output
    bad = runner.invoke(app, [*args, "-c", "forest", "--cache-mb", "0", "-o", str(tmp_path / "c.gpkg")])
    assert bad.exit_code == 2 and "--cache-mb must be at least 1" in bad.output


def region_agreement_field(path: Path) -> np.ndarray:
    _meta, _fids, _geometry, fields = pyogrio.raw.read(path, columns=["region_agr"])
    return np.asarray(fields[0], dtype=float)


def test_a_rerun_takes_its_region_checks_from_the_cache_and_writes_the_same_quality(loaded, tmp_path):
    raster = write_raster(tmp_path / "image.tif")
    cache = FeatureCache(max_bytes=64 * 2**20)
    first = run(raster, loaded, FIRST, tmp_path / "first", cache)
    again = run(raster, loaded, FIRST, tmp_path / "again", cache)
    checks = again.report["quality"]["region_checks"]
    assert checks > 0 and first.report["quality"]["region_cached"] == 0
    assert again.report["quality"]["region_cached"] == checks
    uncached = run(raster, loaded, FIRST, tmp_path / "uncached")
    expected = region_agreement_field(tmp_path / "uncached" / "result.gpkg")
    assert np.isfinite(expected).sum() == checks
    np.testing.assert_allclose(region_agreement_field(tmp_path / "again" / "result.gpkg"), expected, atol=1e-6)
    assert uncached.report["quality"]["region_cached"] == 0


class _CopyEvent:
    """Stands in for the CUDA event recorded after a batch's features were queued for the host."""

    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


def test_gpu_features_go_into_the_cache_without_waiting_for_the_device_between_batches(loaded):
    # On a GPU each batch's features are copied to pinned host memory behind an event; the next batch
    # stores only the copies already done (in order) and the run's end waits for the rest.
    import torch

    from backend.engine.sliding import Segmenter
    from backend.engine.presets import parse_class_lines

    cache = FeatureCache(max_bytes=1 << 20)
    segmenter = Segmenter(loaded, parse_class_lines(FIRST))
    segmenter.use_cache(cache, "scope")
    features = [torch.full((2, 3, 3, 4), float(b)) for b in range(3)]
    events = [_CopyEvent(True), _CopyEvent(False), _CopyEvent(True)]
    for b, (batch, event) in enumerate(zip(features, events)):
        segmenter._to_cache.append(([(b, 0), (b, 1)], batch, event))
    segmenter._store_finished()
    assert cache.get("scope", (0, 1)) is not None and cache.get("scope", (1, 0)) is None
    assert cache.get("scope", (2, 0)) is None, "a later batch waits behind an earlier one: order is kept"
    assert not any(event.waited for event in events)
    segmenter.flush_cache()
    assert events[1].waited and not segmenter._to_cache
    for b in range(3):
        assert (cache.get("scope", (b, 1)) == b).all()


def test_crops_cut_from_strips_on_the_device_give_what_crops_stacked_on_the_host_give(loaded, tmp_path, monkeypatch):
    """On a GPU each crop row's normalised strip is uploaded once and its crops are cut and stacked on
    the device. Forced on here (the CPU stands in for the device), with batches that mix encoded crops
    and crops from the feature cache, a run writes exactly what the host-stacked path writes."""
    from backend.engine.sliding import Segmenter

    raster = write_raster(tmp_path / "image.tif", size=800)
    box, shifted_box = (500000, 4999700, 500300, 5000000), (500200, 4999700, 500800, 5000000)
    host_cache = FeatureCache()
    run(raster, loaded, FIRST, tmp_path / "host_left", host_cache, bbox=box)
    on_host = run(raster, loaded, SECOND, tmp_path / "host", host_cache, bbox=shifted_box)

    uploads = []
    init, upload = Segmenter.__init__, Segmenter.upload_strip

    def strips_on_device(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.strips_on_device = True

    def counted(self, rgb):
        uploads.append(rgb.shape)
        return upload(self, rgb)

    monkeypatch.setattr(Segmenter, "__init__", strips_on_device)
    monkeypatch.setattr(Segmenter, "upload_strip", counted)
    device_cache = FeatureCache()
    run(raster, loaded, FIRST, tmp_path / "device_left", device_cache, bbox=box)
    on_device = run(raster, loaded, SECOND, tmp_path / "device", device_cache, bbox=shifted_box)
    assert uploads and 0 < on_device.features["cached"] < on_device.tiles
    assert on_device.features == on_host.features
    for name in ("classes.tif", "probs.tif"):
        np.testing.assert_array_equal(read(tmp_path / "device" / name), read(tmp_path / "host" / name))
    assert on_device.classes == on_host.classes


def test_damaged_disk_entries_are_misses_never_wrong_features(tmp_path):
    """An empty .npy (np.load: EOFError) ended every later run in a bare "Aborted."; an entry of another shape or
    dtype in a traceback; a NaN entry in 'the model's weights are unusable'. Each is a miss now."""
    entry = np.ones((14, 14, 64), np.float32)
    cache = FeatureCache(max_bytes=0, folder=tmp_path, disk_max_bytes=2**24)
    keys = [(0, i, 224, 224) for i in range(6)]
    for key in keys:
        cache.put("scope", key, entry)
    files = sorted(tmp_path.glob("scope/*.npy"))
    files[0].write_bytes(b"")
    files[1].write_bytes(files[1].read_bytes()[:100])
    np.save(files[2], np.zeros((3, 3), np.float32))
    np.save(files[3], entry.astype(np.float64))
    np.save(files[4], np.full_like(entry, np.nan))
    by_file = {path: key for key, path in ((key, cache._path("scope", key)) for key in keys)}
    found = {path.name: cache.get("scope", by_file[path], ndim=3) for path in files}
    assert [name for name, features in found.items() if features is not None] == [files[5].name]
    np.testing.assert_array_equal(found[files[5].name], entry)


def test_runs_after_cache_files_were_emptied_recompute_and_write_the_same(loaded, tmp_path, monkeypatch):
    import os

    for name in ("FARSLIP_HOME", "FARSLIP_CACHE"):  # this run's entries only
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    model = tmp_path / "tiny.pt"
    save_plain(make_tiny_clip(16), model)
    raster = write_raster(tmp_path / "image.tif")
    runner = CliRunner()
    args = ["segment", str(raster), "--model", str(model), "--cache-features", "--overwrite", "--no-region-checks",
            "-c", "water", "-c", "road", "-q"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a.gpkg"), "--class-raster", str(tmp_path / "a.tif")])
    assert first.exit_code == 0, first.output
    emptied = [path for folder in (os.environ["FARSLIP_HOME"], os.environ["FARSLIP_CACHE"])
               for path in Path(folder).rglob("*.npy")]
    assert {path.parent.parent.name for path in emptied} >= {"features", "text"}, emptied
    for path in emptied:
        path.write_bytes(b"")  # as a power cut can leave them: cache writes are not fsynced
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "b.gpkg"), "--class-raster", str(tmp_path / "b.tif")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(read(tmp_path / "a.tif"), read(tmp_path / "b.tif"))
    assert all(path.stat().st_size > 0 for path in emptied), "the damaged entries were written again"


def test_cache_entries_of_another_shape_or_length_are_recomputed_not_a_traceback(loaded, tmp_path, monkeypatch):
    """A feature, region or text entry of the right dtype and number of dimensions but another shape (another
    model's width, a hand-made file) stopped this run and every later one with a traceback ("stack expects each
    tensor to be equal size"); a header claiming a huge array with a MemoryError; a text entry not of unit length
    was used as is. Each is a miss now: the run recomputes it and writes what the first run wrote."""
    import os

    for name in ("FARSLIP_HOME", "FARSLIP_CACHE"):  # this run's entries only
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    model = tmp_path / "tiny.pt"
    save_plain(make_tiny_clip(16), model)
    raster = write_raster(tmp_path / "image.tif", size=300)
    runner = CliRunner()
    args = ["segment", str(raster), "--model", str(model), "--cache-features", "--overwrite",
            "-c", "water", "-c", "road", "-q"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a.gpkg"), "--class-raster", str(tmp_path / "a.tif")])
    assert first.exit_code == 0, first.output
    entries = [path for folder in (os.environ["FARSLIP_HOME"], os.environ["FARSLIP_CACHE"])
               for path in sorted(Path(folder).rglob("*.npy"))]
    kinds = {np.load(path).ndim for path in entries}
    assert kinds == {1, 3} and any("text" in path.parts for path in entries)
    for number, path in enumerate(entries):
        stored = np.load(path)
        if number % 3 == 0:  # a header that claims 75 GB, then a few bytes
            with open(path, "wb") as handle:
                np.lib.format.write_array_header_1_0(
                    handle, {"descr": "<f4", "fortran_order": False, "shape": (*stored.shape[:-1], 99_999_999)})
                handle.write(b"\0" * 64)
        elif stored.ndim == 1 and number % 3 == 1:  # the right width, not of unit length
            np.save(path, stored * 3)
        else:  # another model's width
            np.save(path, np.ones((*stored.shape[:-1], stored.shape[-1] // 2), np.float32))
    again = runner.invoke(app, [*args, "-o", str(tmp_path / "b.gpkg"), "--class-raster", str(tmp_path / "b.tif")])
    assert again.exit_code == 0, again.output
    assert "Traceback" not in again.output
    assert np.array_equal(read(tmp_path / "a.tif"), read(tmp_path / "b.tif"))
    np.testing.assert_allclose(region_agreement_field(tmp_path / "b.gpkg"), region_agreement_field(tmp_path / "a.gpkg"),
                               atol=1e-6)
