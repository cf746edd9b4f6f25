"""Search a raster by sentence or by example: the index, the ranking, the hits layer, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import torch
import torch.nn.functional as F
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform as warp_transform
from tinymodels import make_tiny_clip, save_plain
from sample_rasters import naip_corner

from backend.engine.dense import normalize_pixels
from backend.engine.errors import EmptyResultError, InputError
from backend.engine.models import load_model
from backend.engine.search import search_raster
from backend.engine.search_queries import SearchOptions, make_queries, split_keywords, validate_search_options
from backend.engine.search_index import PERSPECTIVES, open_index
from backend.engine.text import encode_tokens


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = save_plain(make_tiny_clip(seed=3, vision_width=64), tmp_path_factory.mktemp("model") / "tiny.pt")
    return load_model(str(path), device="cpu")


def naip_crop(shared_data: Path, out: Path, size: int) -> Path:
    """A size x size px crop of the NAIP raster (EPSG:26914, 5 m), written by the test."""
    return naip_corner(shared_data, out, size)


@pytest.fixture
def naip_copy(shared_data, tmp_path) -> Path:
    """500 x 500 px: two levels (224 px = 1120 m and 448 px = 2240 m windows); a copy per test."""
    return naip_crop(shared_data, tmp_path / "naip.tif", 500)


@pytest.fixture(scope="module")
def naip500(shared_data, tmp_path_factory) -> Path:
    """The same crop shared by the tests that only read it: its index is built once and reused."""
    return naip_crop(shared_data, tmp_path_factory.mktemp("shared") / "naip.tif", 500)


def window_pixels(path: Path, bounds) -> np.ndarray:
    """The RGB pixels of a window, read by the test itself with rasterio."""
    with rasterio.open(path) as src:
        window = rasterio.windows.from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
        return src.read([1, 2, 3], window=window).astype(np.float32)


@torch.inference_mode()
def clip_image(loaded, pixels: np.ndarray) -> np.ndarray:
    tensor = normalize_pixels(torch.from_numpy(pixels)[None])
    return F.normalize(loaded.model.encode_image(tensor), dim=-1)[0].numpy()


@torch.inference_mode()
def clip_text(loaded, text: str) -> np.ndarray:
    return F.normalize(encode_tokens(loaded.model, loaded.tokenizer([text])), dim=-1)[0].numpy()


def hits_table(path: Path) -> tuple[dict, list, str]:
    meta, _fids, geometry, fields = pyogrio.raw.read(path)
    return dict(zip(meta["fields"], fields)), [shapely.from_wkb(g) for g in geometry], meta["crs"]


def test_keyword_rule_splits_joined_phrases_and_drops_filler():
    assert split_keywords("a baseball field next to a parking lot") == ["baseball field", "parking lot"]
    assert split_keywords("Many buildings and green trees are around a playground.") == [
        "buildings", "green trees", "playground"]
    assert split_keywords("lots of cars in a parking lot") == ["cars", "parking lot"]
    assert make_queries(["x y"], ["baseball field; parking lot"])[0].keywords == ["baseball field", "parking lot"]
    # A joining word inside a hyphenated word is part of it, not a split.
    assert split_keywords("a house with a built-in pool") == ["house", "built-in pool"]
    assert split_keywords("a stand-by generator near an on-ramp") == ["stand-by generator", "on-ramp"]


def test_empty_sentence_and_mismatched_keywords_are_refused():
    with pytest.raises(InputError, match="empty"):
        make_queries(["  "], None)
    with pytest.raises(InputError, match="once per sentence"):
        make_queries(["a", "b"], ["x"])


def test_text_query_ranks_first_the_window_the_test_computes_best(loaded, shared_data, tmp_path):
    # 440 px: only the native level fits, so every window can be embedded by the test itself.
    raster = naip_crop(shared_data, tmp_path / "naip440.tif", 440)
    sentence = "a lake next to a road"
    with open_index(raster, loaded) as index:
        result = search_raster(index, SearchOptions([sentence], use_keywords=False, top=5), tmp_path / "hits.gpkg")
        assert [level.factor for level in index.levels] == [1]
        windows = [index.levels[0].bounds(i, j) for i in range(3) for j in range(3)]
    text = clip_text(loaded, sentence)
    scores = [float(clip_image(loaded, window_pixels(raster, bounds)) @ text) for bounds in windows]
    best = int(np.argmax(scores))
    fields, geometries, _crs = hits_table(tmp_path / "hits.gpkg")
    assert fields["rank"][0] == 1
    assert geometries[0].bounds == pytest.approx(windows[best])
    assert fields["score"][0] == pytest.approx(scores[best], abs=2e-3)
    assert list(fields["rank"]) == list(range(1, len(fields["rank"]) + 1))
    assert np.all(np.diff(fields["score"]) <= 1e-9)
    assert set(fields["query"]) == {sentence} and set(fields["model"]) == {loaded.name}
    assert np.allclose(fields["scale_m"], 224 * 5.0)
    assert len(set(fields["run_id"])) == 1 and fields["run_id"][0] == result.run_id


def test_keyword_score_is_global_plus_best_perspective_per_keyword(loaded, naip500, tmp_path):
    sentence = "a baseball field next to a parking lot"
    with open_index(naip500, loaded) as index:
        result = search_raster(index, SearchOptions([sentence], top=3), tmp_path / "hits.gpkg")
        entries = index.entries()
    assert result.report["queries"][0]["keywords"] == ["baseball field", "parking lot"]
    from backend.engine.search import KEYWORD_TEMPLATES
    from backend.engine.text import TextEmbedder

    keywords = TextEmbedder(loaded, templates=KEYWORD_TEMPLATES, use_disk_cache=False).embed(
        ["baseball field", "parking lot"]).numpy()
    sentence_vector = clip_text(loaded, sentence)
    expected = np.array([0.5 * e[0] @ sentence_vector + 0.5 * np.mean([(e @ k).max() for k in keywords])
                         for e in entries.embeddings])
    best = int(np.argmax(expected))
    assert result.hits.score[0] == pytest.approx(expected[best], abs=1e-4)
    assert tuple(result.hits.bounds[0]) == pytest.approx(tuple(entries.bounds[best]))
    assert entries.embeddings.shape[1] == len(PERSPECTIVES)


def test_index_is_extent_invariant_and_completed_incrementally(loaded, naip_copy, tmp_path):
    with rasterio.open(naip_copy) as src:
        left, bottom, _right, top = src.bounds
    west = (left, bottom, left + 1200, top)
    with open_index(naip_copy, loaded) as index:
        first = index.ensure(west)
        partial = index.entries(west)
        second = index.ensure()  # the whole raster: only the windows still missing are computed
        assert second.reused == first.computed
        assert second.computed + second.reused + second.empty == index.window_count()
        assert index.ensure().computed == 0
        whole = index.entries()
    shutil.rmtree(index.folder)
    with open_index(naip_copy, loaded) as fresh:
        fresh.ensure()
        rebuilt = fresh.entries()
    lookup = {tuple(b): e for b, e in zip(whole.bounds.round(3), whole.embeddings)}
    for bounds, embedding in zip(partial.bounds.round(3), partial.embeddings):
        assert np.allclose(lookup[tuple(bounds)], embedding, atol=2e-3)
    assert np.allclose(rebuilt.embeddings, whole.embeddings, atol=2e-3)


def test_hits_are_in_the_raster_crs_and_inside_a_bbox_given_in_another_crs(loaded, naip500, tmp_path):
    with rasterio.open(naip500) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    bbox_utm = (left + 200, bottom + 200, right - 200, top - 200)
    xs, ys = warp_transform(crs, CRS.from_epsg(4326), [bbox_utm[0], bbox_utm[2]], [bbox_utm[1], bbox_utm[3]])
    bbox_wgs84 = (min(xs), min(ys), max(xs), max(ys))
    with open_index(naip500, loaded) as index:
        search_raster(index, SearchOptions(["farmland", "a road"], top=4, bbox=bbox_wgs84, bbox_crs="EPSG:4326"),
                      tmp_path / "hits.gpkg")
    fields, geometries, hits_crs = hits_table(tmp_path / "hits.gpkg")
    assert CRS.from_user_input(hits_crs) == crs
    assert sorted(set(fields["query"])) == ["a road", "farmland"]
    for geometry in geometries:
        cx, cy = geometry.centroid.x, geometry.centroid.y
        assert left <= geometry.bounds[0] and geometry.bounds[2] <= right
        assert bottom <= geometry.bounds[1] and geometry.bounds[3] <= top
        # a little slack: the bbox went to WGS84 and back
        assert bbox_utm[0] - 30 <= cx <= bbox_utm[2] + 30 and bbox_utm[1] - 30 <= cy <= bbox_utm[3] + 30


def planted_raster(path: Path) -> list[tuple[float, float]]:
    """A 672 x 672 px raster of smooth noise with one 224-px pattern planted at four grid places."""
    rng = np.random.default_rng(7)
    size, pixel = 672, 2.0
    noise = rng.normal(110, 12, (3, size // 16, size // 16))
    data = np.kron(noise, np.ones((16, 16))).clip(0, 255)
    yy, xx = np.mgrid[0:224, 0:224]
    pattern = np.stack([((xx // 28 + yy // 28) % 2) * 230, ((xx // 56) % 2) * 200, (yy // 112) * 180 + 20])
    places = [(0, 0), (0, 448), (448, 0), (448, 448)]
    for row, col in places:
        data[:, row:row + 224, col:col + 224] = pattern
    transform = from_origin(500000, 4000000, pixel, pixel)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=transform) as dst:
        dst.write(data.astype(np.uint8))
    return [transform * (col + 112, row + 112) for row, col in places]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    raster = tmp_path_factory.mktemp("planted") / "planted.tif"
    return raster, planted_raster(raster)


def test_query_by_example_ranks_the_planted_places_first(loaded, planted, tmp_path):
    raster, centres = planted
    (x, y), others = centres[0], centres[1:]
    with open_index(raster, loaded) as index:
        search_raster(index, SearchOptions(like=(x, y), top=6), tmp_path / "like.gpkg")
    fields, geometries, _crs = hits_table(tmp_path / "like.gpkg")
    top3 = sorted(geometries[:3], key=lambda g: (g.centroid.x, g.centroid.y))
    for geometry, (cx, cy) in zip(top3, sorted(others)):
        assert geometry.centroid.x == pytest.approx(cx) and geometry.centroid.y == pytest.approx(cy)
        assert geometry.area == pytest.approx((224 * 2.0) ** 2)
    assert fields["score"][2] > fields["score"][3]
    assert all(not g.contains(shapely.Point(x, y)) for g in geometries)
    assert list(fields["rank"][:3]) == [1, 2, 3]


def test_query_by_example_point_in_another_crs_and_outside_the_raster(loaded, planted, tmp_path):
    raster, centres = planted
    lon, lat = warp_transform(CRS.from_epsg(32633), CRS.from_epsg(4326), [centres[0][0]], [centres[0][1]])
    with open_index(raster, loaded) as index:
        result = search_raster(index, SearchOptions(like=(lon[0], lat[0]), like_crs="EPSG:4326", top=3),
                               tmp_path / "like.gpkg")
        assert sorted((round(b[0]), round(b[1])) for b in result.hits.bounds) == sorted(
            (round(cx - 224), round(cy - 224)) for cx, cy in centres[1:])
        with pytest.raises(InputError, match="outside the raster") as refused:
            search_raster(index, SearchOptions(like=(0.0, 0.0), top=3), tmp_path / "none.gpkg")
        assert str(refused.value).startswith("The point 0.00, 0.00 is outside")
        assert "e+0" not in str(refused.value)  # fixed-point coordinates (5.2e+06 before)
        # The raster's bounds are on it, its right and bottom sides as much as its left and top.
        left, bottom, right, top = index.dataset.bounds
        for corner in ((left, top), (right, top), (right, bottom), (left, bottom)):
            result = search_raster(index, SearchOptions(like=corner, top=1), tmp_path / "corner.gpkg",
                                   overwrite=True)
            assert len(result.hits.query) == 1, corner
        with pytest.raises(InputError, match="outside the raster"):
            search_raster(index, SearchOptions(like=(right + 0.5, bottom), top=1), tmp_path / "none.gpkg")
    assert not (tmp_path / "none.gpkg").exists()


def test_index_is_rebuilt_when_the_raster_changes(loaded, naip_copy, tmp_path):
    with open_index(naip_copy, loaded) as index:
        index.ensure()
        before = index.entries()
        folder = index.folder
    with rasterio.open(naip_copy, "r+") as dst:
        dst.write(255 - dst.read(1), 1)
    with open_index(naip_copy, loaded) as index:
        assert index.folder == folder
        assert index.rebuilt_reason and "changed" in index.rebuilt_reason
        assert index.missing() == index.window_count()
        result = search_raster(index, SearchOptions(["water"], top=2), tmp_path / "hits.gpkg")
        after = index.entries()
    assert result.notices and "rebuilt" in result.notices[0]
    assert not np.allclose(before.embeddings, after.embeddings, atol=1e-2)
    with open_index(naip_copy, loaded) as again:
        assert again.rebuilt_reason is None and again.missing() == 0


def replace_raster(path: Path) -> None:
    """Another image in the same file: every band inverted."""
    with rasterio.open(path, "r+") as dst:
        dst.write(255 - dst.read())


@pytest.mark.parametrize("manifest", [None, "{ not json", "[]"], ids=["deleted", "invalid-json", "not-an-object"])
def test_an_index_without_a_usable_manifest_is_rebuilt_not_reused(manifest, loaded, naip_copy, tmp_path):
    """Without a manifest the rows cannot be matched to the raster: they were reused (the old raster's scores),
    and a fresh manifest then vouched for them; a manifest of '[]' ended in a traceback."""
    with open_index(naip_copy, loaded) as index:
        index.ensure()
        before = index.entries()
    replace_raster(naip_copy)
    manifest_file = index.folder / "manifest.json"
    if manifest is None:
        manifest_file.unlink()
    else:
        manifest_file.write_text(manifest)
    with open_index(naip_copy, loaded) as index:
        assert index.rebuilt_reason and "manifest" in index.rebuilt_reason
        assert index.missing() == index.window_count()
        result = search_raster(index, SearchOptions(["water"], top=2), tmp_path / "hits.gpkg")
        after = index.entries()
    assert result.notices[0] == index.rebuilt_reason and "rebuilt" in result.notices[0]
    assert result.report["index"]["computed"] == index.window_count() and result.report["index"]["reused"] == 0
    assert not np.allclose(before.embeddings, after.embeddings, atol=1e-2)
    with open_index(naip_copy, loaded) as again:
        assert again.rebuilt_reason is None and again.missing() == 0


def test_a_cache_folder_that_is_a_file_is_refused_in_a_sentence(naip500, loaded, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from backend.service.cli import app

    monkeypatch.setenv("FARSLIP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").write_text("")
    result = CliRunner().invoke(app, ["index", str(naip500), "--model", loaded.metadata["weights_path"],
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"Error: FARSLIP_CACHE names the file {tmp_path / 'cache'}; it must name a "
                                     f"folder: set it to {tmp_path}.")


def test_index_counts_say_what_each_window_is_on_every_run(loaded, tmp_path):
    raster = half_nodata_raster(tmp_path / "nodata460.tif", 460)  # 17 of the 29 windows hold no valid pixel
    progress: list[tuple[int, int]] = []
    with open_index(raster, loaded) as index:
        first = index.ensure()
        second = index.ensure(progress=lambda done, total: progress.append((done, total)))
    assert (first.computed, first.reused, first.empty) == (12, 0, 17)
    assert (second.computed, second.reused, second.empty) == (0, 12, 17)  # empty windows were 'reused', '0 empty'
    assert progress == []  # nothing left to embed was shown as 'indexing: 0/0 tiles'


def test_windows_embedded_for_an_example_are_not_counted_as_reused(loaded, naip_copy, tmp_path):
    with rasterio.open(naip_copy) as ds:
        point = ds.xy(50, 50)
    with open_index(naip_copy, loaded) as index:
        result = search_raster(index, SearchOptions(like=point, top=3), tmp_path / "like.gpkg")
        windows = index.window_count()
    assert (result.report["index"]["computed"], result.report["index"]["reused"]) == (windows, 0)


def test_too_long_sentence_is_truncated_with_a_notice(loaded, naip500, tmp_path):
    sentence = " ".join(["a large blue lake beside green farmland"] * 12)
    with open_index(naip500, loaded) as index:
        result = search_raster(index, SearchOptions([sentence], top=2), tmp_path / "hits.gpkg")
    assert any("reads at most 75" in notice for notice in result.notices)
    assert result.report["notices"] == result.notices


def test_raster_without_valid_pixels_is_refused(loaded, shared_data, tmp_path):
    with pytest.raises(EmptyResultError, match="nothing to index or search"):
        with open_index(shared_data / "all-nodata.tif", loaded):
            pass


def test_existing_output_is_kept_and_nothing_half_written(loaded, naip500, tmp_path):
    out = tmp_path / "hits.gpkg"
    out.write_text("keep me")
    with open_index(naip500, loaded) as index:
        with pytest.raises(InputError, match="already exists"):
            search_raster(index, SearchOptions(["water"]), out)
        with pytest.raises(InputError, match="empty"):
            search_raster(index, SearchOptions([""]), tmp_path / "other.gpkg")
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.gpkg"]


def test_overlapping_windows_are_suppressed_across_scales():
    from backend.engine.search import suppress_overlaps

    bounds = np.array([[0, 0, 224, 224],      # best, native window
                       [0, 0, 448, 448],      # coarse window holding it: covers all of the smaller one
                       [112, 0, 336, 224],    # native neighbour, half overlap: kept at max_overlap 0.5
                       [1000, 0, 1224, 224]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    assert suppress_overlaps(bounds, scores, top=10).tolist() == [0, 2, 3]
    assert suppress_overlaps(bounds, scores, top=10, max_overlap=0.4).tolist() == [0, 3]
    assert suppress_overlaps(bounds, scores, top=1).tolist() == [0]


def test_search_command_exit_codes_and_notices(naip500, loaded, tmp_path):
    from typer.testing import CliRunner

    from backend.service.cli import app

    model = loaded.metadata["weights_path"]
    runner = CliRunner()
    empty = runner.invoke(app, ["search", str(naip500), "", "--model", model, "--out", str(tmp_path / "a.gpkg")])
    assert empty.exit_code == 2 and "empty" in empty.output
    missing = runner.invoke(app, ["search", str(naip500.parent / "missing.tif"), "x", "--model", model,
                                 "--out", str(tmp_path / "b.gpkg")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    long_sentence = " ".join(["a wide river between green fields"] * 14)
    done = runner.invoke(app, ["search", str(naip500), long_sentence, "farmland", "--top", "2", "--model", model,
                               "--out", str(tmp_path / "c.gpkg"), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert "reads at most 75" in done.output and "Wrote 4 hits" in done.output
    assert list(pyogrio.raw.read(tmp_path / "c.gpkg")[3][0]) == [1, 2, 1, 2]


def test_a_guess_of_the_colour_bands_is_a_notice_unless_the_bands_are_named(shared_data, loaded, tmp_path):
    from typer.testing import CliRunner

    from backend.service.cli import app

    # Two bands of naip_2020_5m.tif, naming no colours: the second would be left out without a word.
    with rasterio.open(shared_data / "naip_2020_5m.tif") as src:
        window = rasterio.windows.Window(0, 0, 300, 300)
        profile = src.profile | {"width": 300, "height": 300, "count": 2, "transform": src.window_transform(window),
                                 "photometric": "MINISBLACK"}
        with rasterio.open(tmp_path / "two.tif", "w", **profile) as dst:
            dst.write(src.read([1, 4], window=window))
    runner = CliRunner()
    args = ["search", str(tmp_path / "two.tif"), "farmland", "--model", loaded.metadata["weights_path"]]
    guessed = runner.invoke(app, [*args, "--out", str(tmp_path / "a.gpkg")])
    assert guessed.exit_code == 0, guessed.output
    assert "two.tif has 2 bands and names no colours: band 1 is read as grey and band 2 is not used" in guessed.output
    named = runner.invoke(app, [*args, "--bands", "2", "--out", str(tmp_path / "b.gpkg")])
    assert named.exit_code == 0 and "is read as grey" not in named.output, named.output


def test_all_nodata_raster_exits_4_from_the_command(shared_data, loaded, tmp_path):
    from typer.testing import CliRunner

    from backend.service.cli import app

    result = CliRunner().invoke(app, ["index", str(shared_data / "all-nodata.tif"), "--model",
                                      loaded.metadata["weights_path"], "--device", "cpu"])
    assert result.exit_code == 4 and "nothing to index or search" in result.output


def test_damaged_row_files_of_the_index_are_embedded_again(loaded, naip_copy, tmp_path):
    # A row file cut short (a full disk, a crash) and an empty one (a rename that outlived its data).
    with open_index(naip_copy, loaded) as index:
        index.ensure()
        before = index.entries()
        rows = sorted(index.folder.glob("L1/row*.npz"))
        per_row = len(index.levels[0].col_starts)
    rows[0].write_bytes(rows[0].read_bytes()[:100])
    rows[1].write_bytes(b"")
    with open_index(naip_copy, loaded) as index:
        assert index.missing() == 2 * per_row
        result = search_raster(index, SearchOptions(["water"], top=2), tmp_path / "hits.gpkg")
        after = index.entries()
    assert result.report["index"]["computed"] == 2 * per_row
    assert len(hits_table(tmp_path / "hits.gpkg")[1]) == 2
    assert np.allclose(after.bounds, before.bounds) and np.allclose(after.embeddings, before.embeddings, atol=2e-3)
    with open_index(naip_copy, loaded) as index:
        assert index.missing() == 0


def half_nodata_raster(path: Path, nodata_cols: int) -> Path:
    """672 x 672 px of noise at 2 m (EPSG:32633) whose columns 0..nodata_cols-1 are nodata (0)."""
    rng = np.random.default_rng(11)
    data = rng.integers(30, 220, (3, 672, 672)).astype(np.uint8)
    data[:, :, :nodata_cols] = 0
    with rasterio.open(path, "w", driver="GTiff", width=672, height=672, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 2.0, 2.0)) as dst:
        dst.write(data)
    return path


def test_an_example_point_on_nodata_is_refused_or_its_empty_scales_named(loaded, tmp_path):
    point = (500000 + 10 * 2.0, 4000000 - 10 * 2.0)  # pixel (10, 10)
    # Nodata up to column 460: the windows under the point (224 and 448 px) hold no valid pixel.
    raster = half_nodata_raster(tmp_path / "nodata460.tif", 460)
    with open_index(raster, loaded) as index:
        with pytest.raises(InputError, match=r"lies on nodata pixels of nodata460\.tif"):
            search_raster(index, SearchOptions(like=point, top=5), tmp_path / "none.gpkg")
    assert not (tmp_path / "none.gpkg").exists()
    # Nodata up to column 300: the 224-px window under the point is empty, the 448-px one is not.
    raster = half_nodata_raster(tmp_path / "nodata300.tif", 300)
    with open_index(raster, loaded) as index:
        result = search_raster(index, SearchOptions(like=point, top=5), tmp_path / "like.gpkg")
    assert any("no valid pixel at 448 m" in notice for notice in result.notices)
    fields, geometries, _crs = hits_table(tmp_path / "like.gpkg")
    assert len(geometries) > 0 and set(fields["scale_m"]) == {896.0}


def test_a_bbox_smaller_than_a_window_is_searched_by_the_windows_over_it(loaded, naip500, tmp_path):
    with rasterio.open(naip500) as src:
        left, top = src.bounds.left, src.bounds.top
    box = (left + 700, top - 760, left + 750, top - 710)  # 50 m, well inside the 2500 m raster
    with open_index(naip500, loaded) as index:
        result = search_raster(index, SearchOptions(["a road"], top=5, bbox=box), tmp_path / "hits.gpkg")
    _fields, geometries, _crs = hits_table(tmp_path / "hits.gpkg")
    assert len(geometries) >= 1 and result.report["windows_searched"] >= 1
    for geometry in geometries:  # each hit holds the whole box
        assert geometry.contains(shapely.box(*box))


def test_example_point_label_keeps_about_ten_centimetres(loaded, planted, tmp_path):
    raster, centres = planted
    lon, lat = warp_transform(CRS.from_epsg(32633), CRS.from_epsg(4326), [centres[0][0]], [centres[0][1]])
    with open_index(raster, loaded) as index:
        search_raster(index, SearchOptions(like=(lon[0], lat[0]), like_crs="EPSG:4326", top=1), tmp_path / "a.gpkg")
        search_raster(index, SearchOptions(like=centres[0], top=1), tmp_path / "b.gpkg")
    assert hits_table(tmp_path / "a.gpkg")[0]["query"][0] == f"like {lon[0]:.6f} {lat[0]:.6f} (EPSG:4326)"
    assert hits_table(tmp_path / "b.gpkg")[0]["query"][0] == f"like {centres[0][0]:.2f} {centres[0][1]:.2f}"


@pytest.mark.parametrize("again", ["A road ", "a  road", "\uff41 road", "a\u200b road"])
def test_a_sentence_given_twice_is_refused(again):
    """As class names: letter case, full-width letters, runs of spaces and invisible marks do not make
    another sentence (its hits would be listed twice)."""
    with pytest.raises(InputError, match="was given twice"):
        make_queries(["a road", "farmland", again], None)


def test_query_by_example_on_a_raster_of_one_window_says_why_it_has_no_hits(loaded, shared_data, tmp_path):
    """Every window of a 224 x 224 raster holds its centre: '0 hits' came without a word."""
    raster = naip_crop(shared_data, tmp_path / "one.tif", 224)
    with rasterio.open(raster) as ds:
        centre = ds.xy(112, 112)
    with open_index(raster, loaded) as index:
        result = search_raster(index, SearchOptions(like=centre, top=3), tmp_path / "like.gpkg")
    assert len(result.hits.query) == 0
    assert any(notice.startswith("Every window searched holds the example point") for notice in result.notices)
    assert result.report["notices"] == result.notices


def rotated_raster(path: Path, size: int = 500, angle: float = 30.0) -> Path:
    """size x size px of a checker pattern at 2 m (EPSG:32618) on a grid turned by `angle` degrees."""
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.stack([((xx // 30) % 2) * 200 + 20, ((yy // 30) % 2) * 180 + 30, (xx + yy) % 200]).astype(np.uint8)
    transform = Affine(2, 0, 500000, 0, -2, 4100000) @ Affine.rotation(angle)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32618", transform=transform) as dst:
        dst.write(data)
    return path


def grid_footprints(path: Path) -> list[shapely.Polygon]:
    """Every window of the index's grid on the ground, computed by the test: 224-px windows with stride 112 on
    the raster resampled by 1, 2 and 4 (a level only when it holds a whole window), the last row and column
    shifted back to end at the edge; the affine applied to each window's four pixel corners."""
    with rasterio.open(path) as src:
        transform, width, height = src.transform, src.width, src.height
    footprints = []
    for factor in (1, 2, 4):
        level_w, level_h = round(width / factor), round(height / factor)
        if factor > 1 and min(level_w, level_h) < 224:
            continue
        sx, sy = width / level_w, height / level_h
        rows = sorted({*range(0, level_h - 224, 112), level_h - 224})
        cols = sorted({*range(0, level_w - 224, 112), level_w - 224})
        for r in rows:
            for c in cols:
                corners = [(c, r), (c + 224, r), (c + 224, r + 224), (c, r + 224)]
                footprints.append(shapely.Polygon([transform @ (x * sx, y * sy) for x, y in corners]))
    return footprints


def raster_footprint_of(path: Path) -> shapely.Polygon:
    with rasterio.open(path) as src:
        return shapely.Polygon([src.transform @ c for c in ((0, 0), (src.width, 0), (src.width, src.height),
                                                             (0, src.height))])


def same_polygon(a, b) -> bool:
    return bool(shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), tolerance=1e-6))


def matching_window(geometry, windows: list) -> int:
    """The index of the grid window whose footprint the hit is (exactly one)."""
    found = [i for i, window in enumerate(windows) if same_polygon(geometry, window)]
    assert len(found) == 1, (geometry.wkt, found)
    return found[0]


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> Path:
    """500 x 500 px turned by 30 degrees: 16 windows of 224 px and 4 of 448 px."""
    return rotated_raster(tmp_path_factory.mktemp("rotated") / "rot.tif")


def test_hits_on_a_rotated_raster_are_their_windows_footprints(loaded, rotated, tmp_path):
    """A hit was the envelope of its window: 6 % of it lay off the raster, and its corners off the window."""
    windows, footprint = grid_footprints(rotated), raster_footprint_of(rotated)
    with open_index(rotated, loaded) as index:  # every window, none suppressed
        result = search_raster(index, SearchOptions(["a lake", "a farm"], top=100, max_overlap=1.0),
                               tmp_path / "hits.gpkg")
    fields, geometries, _crs = hits_table(tmp_path / "hits.gpkg")
    assert len(geometries) == 2 * len(windows) == 40
    for query in ("a lake", "a farm"):
        mine = [g for g, q in zip(geometries, fields["query"]) if q == query]
        assert sorted(matching_window(g, windows) for g in mine) == list(range(len(windows)))
    for geometry, scale, record in zip(geometries, fields["scale_m"], result.hits.records()):
        assert geometry.difference(footprint).area <= 1e-9 * geometry.area  # on the raster
        assert geometry.area == pytest.approx(scale ** 2)  # a window, not its envelope (1.37 times as big)
        assert shapely.is_ccw(geometry.exterior)
        assert same_polygon(shapely.Polygon(record["footprint"]), geometry)  # the server's and the report's hits
        assert record["bbox"] == pytest.approx(list(geometry.bounds), abs=1e-5)


def test_hits_on_a_north_up_raster_are_the_windows_rectangles(loaded, naip500, tmp_path):
    with open_index(naip500, loaded) as index:
        result = search_raster(index, SearchOptions(["a road"], top=100, max_overlap=1.0), tmp_path / "hits.gpkg")
    _fields, geometries, _crs = hits_table(tmp_path / "hits.gpkg")
    windows = grid_footprints(naip500)
    assert len(geometries) == len(windows) == 20
    for geometry, bounds in zip(geometries, result.hits.bounds):
        assert same_polygon(geometry, shapely.box(*bounds))
        assert geometry.area == pytest.approx(shapely.box(*geometry.bounds).area)
    assert sorted(matching_window(g, windows) for g in geometries) == list(range(len(windows)))


def test_query_by_example_on_a_rotated_raster_leaves_out_the_windows_over_the_point_only(loaded, rotated, tmp_path):
    """The windows whose envelope (not footprint) holds the example point are other places: they are ranked."""
    windows = grid_footprints(rotated)
    with rasterio.open(rotated) as src:
        point = src.transform @ (250, 30)  # near the top edge, inside the raster
    holding = {i for i, w in enumerate(windows) if w.covers(shapely.Point(point))}
    envelope_only = {i for i, w in enumerate(windows)
                     if shapely.box(*w.bounds).covers(shapely.Point(point)) and i not in holding}
    assert holding and envelope_only
    with open_index(rotated, loaded) as index:
        search_raster(index, SearchOptions(like=point, top=100, max_overlap=1.0), tmp_path / "like.gpkg")
    _fields, geometries, _crs = hits_table(tmp_path / "like.gpkg")
    found = {matching_window(g, windows) for g in geometries}
    assert found == set(range(len(windows))) - holding
    assert envelope_only <= found


def test_a_point_off_a_rotated_raster_is_refused_by_its_footprint(loaded, rotated, tmp_path):
    """The sentence quoted the raster's envelope, which holds the refused point."""
    footprint = raster_footprint_of(rotated)
    left, _bottom, right, top = footprint.bounds
    point = (left + 10.0, top - 10.0)  # in the envelope's corner, off the turned raster
    assert not footprint.contains(shapely.Point(point))
    with open_index(rotated, loaded) as index:
        with pytest.raises(InputError) as refused:
            search_raster(index, SearchOptions(like=point, top=3), tmp_path / "like.gpkg")
    message = str(refused.value)
    assert message.startswith(f"The point {point[0]:.2f}, {point[1]:.2f} is outside the footprint of the raster "
                              "rot.tif, whose grid is rotated: its corners are (500000.00, 4100000.00), ")
    assert f"{left:.2f}..{right:.2f}" not in message and "covers" not in message
    assert not (tmp_path / "like.gpkg").exists()


def test_a_bbox_on_a_rotated_raster_is_met_by_window_footprints(loaded, rotated, tmp_path):
    footprint = raster_footprint_of(rotated)
    windows = grid_footprints(rotated)
    cx, cy = footprint.centroid.x, footprint.centroid.y
    box = (cx - 300, cy - 250, cx + 350, cy + 300)
    region = footprint.intersection(shapely.box(*box))
    expected = set()
    for i, window in enumerate(windows):  # the documented rule, on the footprints
        part = window.intersection(region)
        if part.is_empty:
            continue
        spans = [part.bounds[2] - part.bounds[0], part.bounds[3] - part.bounds[1]]
        sides = [min(window.bounds[2] - window.bounds[0], region.bounds[2] - region.bounds[0]),
                 min(window.bounds[3] - window.bounds[1], region.bounds[3] - region.bounds[1])]
        if all(s > 0 and s >= 0.5 * side for s, side in zip(spans, sides)):
            expected.add(i)
    with open_index(rotated, loaded) as index:
        result = search_raster(index, SearchOptions(["a lake"], top=100, max_overlap=1.0, bbox=box),
                               tmp_path / "hits.gpkg")
        assert result.report["windows_searched"] == len(expected)
        # A box in the envelope's corner meets no pixel of the turned raster.
        left, _bottom, _right, top = footprint.bounds
        with pytest.raises(InputError, match=r"does not overlap the raster rot\.tif: its grid is rotated"):
            search_raster(index, SearchOptions(["a lake"], bbox=(left, top - 20, left + 20, top)),
                          tmp_path / "none.gpkg")
    _fields, geometries, _crs = hits_table(tmp_path / "hits.gpkg")
    assert {matching_window(g, windows) for g in geometries} == expected
    assert all(g.difference(footprint).area <= 1e-9 * g.area for g in geometries)
    assert not (tmp_path / "none.gpkg").exists()


def test_the_server_checks_a_rotated_raster_by_its_footprint(rotated):
    """/v1/search and /v1/index refuse at submit what the search refuses: a point or box off the footprint."""
    from backend.service.search_jobs import _check_raster

    footprint = raster_footprint_of(rotated)
    left, _bottom, _right, top = footprint.bounds
    with pytest.raises(InputError, match=r"outside the footprint of the raster rot\.tif"):
        _check_raster({"raster": str(rotated), "like": [left + 10.0, top - 10.0]})
    with pytest.raises(InputError, match=r"does not overlap the raster rot\.tif: its grid is rotated"):
        _check_raster({"raster": str(rotated), "bbox": [left, top - 20, left + 20, top]})
    cx, cy = footprint.centroid.x, footprint.centroid.y
    _check_raster({"raster": str(rotated), "bbox": [cx - 50, cy - 50, cx + 50, cy + 50], "like": [cx, cy]})


def test_geojson_hits_are_refused_for_a_crs_without_a_code(loaded, tmp_path):
    """GeoJSON records a CRS only by its code: hits of a raster in a PROJ-string CRS had no CRS in the file and
    read back as WGS 84 degrees. Refused before the search, as segment and classify refuse it."""
    raster = tmp_path / "custom.tif"
    with rasterio.open(raster, "w", driver="GTiff", width=240, height=240, count=3, dtype="uint8",
                       crs="+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9996 +x_0=150000 +y_0=0 +ellps=GRS80 +units=m",
                       transform=from_origin(150000, 480, 2.0, 2.0)) as dst:
        dst.write(np.random.default_rng(1).integers(0, 255, (3, 240, 240), dtype=np.uint8))
    with open_index(raster, loaded) as index:
        with pytest.raises(InputError, match="GeoJSON cannot record the CRS"):
            search_raster(index, SearchOptions(["a lake"], top=2), tmp_path / "hits.geojson")
        assert not (tmp_path / "hits.geojson").exists()
        search_raster(index, SearchOptions(["a lake"], top=2), tmp_path / "hits.gpkg")
    assert CRS.from_user_input(pyogrio.read_info(tmp_path / "hits.gpkg")["crs"]).to_epsg() is None


@pytest.mark.parametrize("raster", ["naip500", "rotated"])
def test_a_bbox_of_the_largest_numbers_searches_every_window(raster, loaded, request, tmp_path):
    """A box of +-1e308 holds the whole raster, as `segment` takes it: it was refused as not overlapping."""
    path = request.getfixturevalue(raster)
    with open_index(path, loaded) as index:
        whole = search_raster(index, SearchOptions(["a lake"], top=3), tmp_path / "whole.gpkg")
        huge = search_raster(index, SearchOptions(["a lake"], top=3, bbox=(-1e308, -1e308, 1e308, 1e308)),
                             tmp_path / "huge.gpkg")
    assert huge.report["windows_searched"] == whole.report["windows_searched"] > 0
    assert hits_table(tmp_path / "huge.gpkg")[1] == hits_table(tmp_path / "whole.gpkg")[1]


def test_fewer_hits_than_asked_are_explained(loaded, naip500, tmp_path):
    """`--top 5` gave 4 hits with no word: the other windows overlapped those by more than --max-overlap (or the
    area held fewer windows). Each query short of --top says which."""
    with open_index(naip500, loaded) as index:
        windows = index.window_count()
        many = search_raster(index, SearchOptions(["a lake", "a road"], top=windows + 5, max_overlap=1.0),
                             tmp_path / "all.gpkg")
        tight = search_raster(index, SearchOptions(["a lake"], top=windows, max_overlap=0.01), tmp_path / "t.gpkg")
        enough = search_raster(index, SearchOptions(["a lake"], top=1), tmp_path / "one.gpkg")
    for query in ("a lake", "a road"):
        hits = sum(1 for q in many.hits.query if q == query)
        assert f"'{query}' has {hits} hits, not --top {windows + 5}: the area searched holds only {hits} windows." \
            in many.notices
    kept = len(tight.hits.query)
    assert kept < windows
    assert any(notice.startswith(f"'a lake' has {kept} hit") and "--max-overlap 0.01" in notice
               for notice in tight.notices), tight.notices
    assert not any("not --top" in notice for notice in enough.notices)
    assert many.report["notices"] == many.notices
    with rasterio.open(naip500) as ds:
        point = ds.xy(50, 50)
    with open_index(naip500, loaded) as index:
        like = search_raster(index, SearchOptions(like=point, top=windows, max_overlap=1.0), tmp_path / "like.gpkg")
    kept = len(like.hits.query)
    assert kept < windows  # the windows holding the point are no hits, and the notice counts without them
    assert any(notice.endswith(f"holds only {kept} windows besides those holding the example point.")
               for notice in like.notices), like.notices


@pytest.mark.parametrize("like", [["nan", "5206000"], ["486000", "inf"]])
def test_an_example_point_that_is_not_a_number_is_said_so(naip500, loaded, tmp_path, like):
    """It was "The point nan, 0.00 is outside the raster"."""
    from typer.testing import CliRunner

    from backend.service.cli import app

    result = CliRunner().invoke(app, ["search", str(naip500), "--like", *like, "--model",
                                      loaded.metadata["weights_path"], "--out", str(tmp_path / "x.gpkg")])
    assert result.exit_code == 2 and result.output.startswith("Error: --like takes the example point as two "
                                                              "numbers, X Y; got "), result.output
    assert not (tmp_path / "x.gpkg").exists()


@pytest.mark.parametrize("options, words", [
    (SearchOptions(like=(1.0, 2.0), keywords=["tennis court; houses"]), "no sentence was given"),
    (SearchOptions(["a lake"], keywords=["tennis court"], use_keywords=False), "--no-keywords says to use none"),
])
def test_keywords_that_would_be_ignored_are_refused(options, words):
    """Keywords without a sentence, or with --no-keywords, did nothing: the run must not look as if they had."""
    with pytest.raises(InputError, match=words):
        validate_search_options(options)


def test_rows_written_for_the_old_raster_after_another_command_rebuilt_the_index_are_never_used(loaded, naip_copy):
    """Two commands on one raster while it is re-exported: the first, still reading the old file, went on writing
    rows into the folder the second had rebuilt for the new file, and every later search trusted them."""
    with open_index(naip_copy, loaded) as stale:  # opened before the raster was replaced
        new = naip_copy.with_name("new.tif")
        shutil.copyfile(naip_copy, new)
        replace_raster(new)
        os.replace(new, naip_copy)  # as an export does: a new file; the open one still reads the old pixels
        with open_index(naip_copy, loaded) as rebuilt:
            assert rebuilt.rebuilt_reason and "changed" in rebuilt.rebuilt_reason
        stale.ensure()  # the old pixels' rows, in the rebuilt folder
    with open_index(naip_copy, loaded) as fresh:
        assert fresh.missing() == fresh.window_count(), "rows of the old raster were taken for the new one's"
        fresh.ensure()
        again = fresh.entries()
    with open_index(naip_copy, loaded) as reopened:
        assert reopened.missing() == 0, "rows embedded from the current raster are kept"
        np.testing.assert_array_equal(reopened.entries().embeddings, again.embeddings)


def test_an_index_built_with_another_model_is_rebuilt(loaded, naip_copy, tmp_path):
    other = load_model(str(save_plain(make_tiny_clip(seed=4, vision_width=64), tmp_path / "other.pt")), device="cpu")
    with open_index(naip_copy, loaded) as index:
        index.ensure()
        folder = index.folder
    with open_index(naip_copy, other) as foreign:
        foreign.ensure()
        foreign_folder = foreign.folder
    shutil.rmtree(folder)
    shutil.copytree(foreign_folder, folder)  # another model's index where this model's belongs
    with open_index(naip_copy, loaded) as index:
        assert index.rebuilt_reason == (f"The search index of naip.tif in {folder} was built with another model "
                                        "than this one; the index was rebuilt.")
        assert index.missing() == index.window_count()
