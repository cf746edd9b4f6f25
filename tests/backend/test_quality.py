"""A label-free quality estimate per polygon and per run (RS-SQA row)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import torch
from typer.testing import CliRunner

from backend.engine.errors import InputError
from backend.engine.quality import (
    MIN_CALIBRATION_TILES,
    MIN_CROP,
    QualityModel,
    RegionPixels,
    calibration_path_for,
    fit_quality_model,
    pixel_signals,
    rank_agreement,
    region_crop_window,
    same_classes,
    top_two,
)
from backend.engine.raster import PixelWindow, open_source
from backend.service.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tinymodels import make_tiny_clip, save_plain

    return save_plain(make_tiny_clip(16), tmp_path_factory.mktemp("q") / "tiny16.pt")


def test_region_windows_hold_the_polygon_and_come_from_a_fixed_ladder_and_grid():
    # Fixed sides and corners let a polygon that comes back in a run with other classes reuse its check.
    import shapely
    from rasterio.transform import from_origin

    transform = from_origin(1000, 2000, 1.0, 1.0)  # window (100, 50) of a 1000 x 800 grid
    window = PixelWindow(100, 50, 600, 500)
    ladder = {min(math.ceil(MIN_CROP * 2 ** (k / 2)), 800) for k in range(20)}
    for x0, y0, size in [(1010, 1950, 5), (1100, 1700, 37), (1003, 1800, 120), (1300, 1900, 333), (1000, 2000, 10)]:
        window_box = region_crop_window(shapely.box(x0, y0 - size, x0 + size, y0), transform, window, (1000, 800))
        assert window_box.height == window_box.width and window_box.height in ladder
        assert window_box.height >= min(size * 2, 800)
        grid = max(window_box.height // 4, 1)
        row = 100 + (2000 - y0)
        col = 50 + (x0 - 1000)
        assert window_box.row_off <= row and row + size <= window_box.row_off + window_box.height
        assert window_box.col_off <= col and col + size <= window_box.col_off + window_box.width
        side = window_box.height
        assert window_box.row_off in (0, 1000 - side) or window_box.row_off % grid == 0
        assert window_box.col_off in (0, 800 - side) or window_box.col_off % grid == 0


def test_large_region_crops_are_sampled_from_one_lattice_read_once_whatever_else_is_checked(tmp_path, monkeypatch):
    import backend.engine.quality as quality
    from backend.service.bench import write_test_raster

    # A 1000 x 1000 raster with a lattice bound of 40,000 pixels: every 5th row and column.
    monkeypatch.setattr(quality, "OVERVIEW_PIXELS", 40_000)
    path = write_test_raster(tmp_path / "r.tif", 1000, block=256)
    with open_source(path, None, None, None, None) as source:
        full, _ = source.read(PixelWindow(0, 0, 1000, 1000))
        pixels = RegionPixels(source, 64)
        assert pixels.step == 5
        large = [PixelWindow(0, 0, 1000, 1000), PixelWindow(300, 200, 512, 512), PixelWindow(640, 680, 360, 320)]
        middle, small = PixelWindow(100, 100, 200, 200), PixelWindow(10, 20, 100, 100)
        counting = {"pixels": 0}
        plain_read = source.read

        def counted_read(window, shape=None, every=1):
            counting["pixels"] += window.height * window.width
            return plain_read(window, shape, every)

        monkeypatch.setattr(source, "read", counted_read)
        reader = RegionPixels(source, 64)
        reader.prepare([*large, middle, small])
        assert counting["pixels"] <= 1000 * 1000  # the lattice: one pass over the rows under the crops
        for crop in large:
            got = reader.read(crop)
            assert got.shape == (3, 64, 64)
            # Each pixel is the lattice pixel (index * 5 + 2) nearest to one of 64 evenly spaced centres.
            centres_r = crop.row_off + (np.arange(64) + 0.5) * crop.height / 64 - 0.5
            centres_c = crop.col_off + (np.arange(64) + 0.5) * crop.width / 64 - 0.5
            rows = np.clip(np.rint((centres_r - 2) / 5), 0, 199).astype(int) * 5 + 2
            cols = np.clip(np.rint((centres_c - 2) / 5), 0, 199).astype(int) * 5 + 2
            assert np.array_equal(got, full[:, rows[:, None], cols[None, :]])
            assert np.abs(rows - centres_r).max() <= 2.5 and np.abs(cols - centres_c).max() <= 2.5
            # The same pixels whichever other crops a run checks (the feature cache relies on it).
            alone = RegionPixels(source, 64)
            alone.prepare([crop])
            assert np.array_equal(alone.read(crop), got)
        before = counting["pixels"]
        assert reader.read(middle).shape == (3, 64, 64)  # decimated by GDAL as it reads
        assert np.array_equal(reader.read(small), full[:, 10:110, 20:120])  # full resolution
        assert counting["pixels"] == before + 200 * 200 + 100 * 100


def test_margin_and_entropy_follow_their_definitions():
    probs = np.array([[[0.9, 0.4]], [[0.05, 0.35]], [[0.05, 0.25]]], np.float32)  # 3 classes, 1x2 pixels
    margin, entropy = pixel_signals(probs)
    assert margin[0, 0] == pytest.approx(0.85) and margin[0, 1] == pytest.approx(0.05)
    p = probs[:, 0, 1] / probs[:, 0, 1].sum()
    assert entropy[0, 1] == pytest.approx(-(p * np.log(p)).sum() / math.log(3), rel=1e-5)
    assert entropy[0, 0] < entropy[0, 1] <= 1.0
    nodata = np.full((3, 1, 1), np.nan, np.float32)
    assert all(np.isnan(v).all() for v in pixel_signals(nodata))
    # No probability at all (a refined map can hold such pixels): margin and entropy 0, not NaN.
    nothing = np.zeros((3, 2, 2), np.float32)
    nothing[:, 0, 0] = [0.2, 0.5, 0.3]
    margin, entropy = pixel_signals(nothing)
    assert margin[1, 1] == 0.0 and entropy[1, 1] == 0.0 and 0 < entropy[0, 0] < 1


def test_top_two_gives_the_winner_listed_first_on_a_tie_and_the_runner_up_with_nan_kept():
    rng = np.random.default_rng(3)
    probs = rng.random((5, 40, 30)).astype(np.float32)
    probs[2, 0, :] = probs[4, 0, :] = 2.0          # a tie for the lead: the first class wins, margin 0
    probs[:, 1, 0] = np.nan                         # an invalid pixel stays NaN
    probs[3, 1, 1] = np.nan                         # so does one with a single NaN class
    best, ids, runner_up = (t.numpy() for t in top_two(torch.from_numpy(probs)))
    assert ids.dtype == np.uint8
    finite = np.isfinite(probs).all(axis=0)
    ranked = np.sort(probs, axis=0)
    assert np.array_equal(ids[finite], probs.argmax(axis=0)[finite])
    assert np.array_equal(best[finite], ranked[-1][finite])
    assert np.array_equal(runner_up[finite], ranked[-2][finite])
    assert (ids[0] == 2).all() and (best[0] - runner_up[0] == 0).all()
    assert np.isnan(best[1, 0]) and np.isnan(runner_up[1, 0])
    assert np.isnan(runner_up[1, 1])
    single = top_two(torch.from_numpy(probs[:1]))
    assert np.array_equal(single[0].numpy(), probs[0], equal_nan=True) and not single[1].numpy().any()
    many = rng.random((250, 20, 20)).astype(np.float32)  # class ids up to 249 in uint8
    assert np.array_equal(top_two(torch.from_numpy(many))[1].numpy(), many.argmax(axis=0))


def test_every_polygon_gets_a_quality_and_the_run_an_estimated_miou(tiny_model, shared_data, tmp_path):
    out = tmp_path / "q.gpkg"
    result = runner.invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"), "-c", "water, lake",
                                 "-c", "cropland, bare field", "-c", "grassland", "--model", str(tiny_model),
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    meta, _, _, columns = pyogrio.raw.read(out)
    fields = dict(zip(meta["fields"], columns))
    for name in ("quality", "margin", "entropy", "sharpness", "region_agr"):
        assert name in fields
    quality = np.asarray(fields["quality"], float)
    assert len(quality) > 0 and np.isfinite(quality).all() and ((quality > 0) & (quality < 1)).all()
    assert ((np.asarray(fields["margin"]) >= 0) & (np.asarray(fields["margin"]) <= 1)).all()
    # Region checks: only polygons of at least one patch, the largest first.
    checked = np.isfinite(np.asarray(fields["region_agr"], float))
    assert 0 < checked.sum() < len(quality)
    report = json.loads(out.with_suffix(".report.json").read_text())
    estimate = report["quality"]["estimated_miou"]
    assert 0 < estimate < 1 and report["quality"]["calibration"] == "default"
    assert report["quality"]["region_checks"] == int(checked.sum())


def test_no_region_checks_gives_the_same_polygons_with_quality_from_the_pixel_signals(tiny_model, shared_data,
                                                                                      tmp_path):
    runs = {}
    for name, flags in (("checked", []), ("plain", ["--no-region-checks"])):
        out = tmp_path / f"{name}.gpkg"
        result = runner.invoke(app, ["segment", str(shared_data / "naip_2020_5m.tif"), "-c", "water, lake",
                                     "-c", "cropland, bare field", "--model", str(tiny_model), "--out", str(out),
                                     "--quiet", *flags])
        assert result.exit_code == 0, result.output
        meta, _, geometry, columns = pyogrio.raw.read(out)
        runs[name] = (list(geometry), dict(zip(meta["fields"], columns)),
                      json.loads(out.with_suffix(".report.json").read_text()))
    (checked_geometry, checked, checked_report), (plain_geometry, plain, plain_report) = runs["checked"], runs["plain"]
    assert plain_geometry == checked_geometry
    assert list(plain["class"]) == list(checked["class"])
    assert np.isfinite(np.asarray(checked["region_agr"], float)).any()
    assert np.isnan(np.asarray(plain["region_agr"], float)).all()
    assert plain_report["quality"]["region_checks"] == 0 < checked_report["quality"]["region_checks"]
    # Switched off is said as such: 0 checks also come from a run without a polygon large enough.
    assert (plain_report["quality"]["region_checks_on"], checked_report["quality"]["region_checks_on"]) == (False, True)
    quality = np.asarray(plain["quality"], float)
    assert np.isfinite(quality).all() and ((quality > 0) & (quality < 1)).all()


def test_a_fitted_model_ranks_like_the_truth_and_is_refused_for_other_models(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 1, 40)
    # Signals that carry the truth with noise, as a good segmentation's would.
    signals = np.column_stack([0.4 + 0.5 * truth, truth * 0.6, 1 - truth, 0.1 + 0.2 * truth, truth]) \
        + rng.normal(0, 0.08, (40, 5))
    model = fit_quality_model(signals, truth, "a" * 64, ["water", "forest"])
    agreement = rank_agreement(model.predict(signals), truth)
    assert agreement["srocc"] > 0.8 and agreement["plcc"] > 0.8
    path = model.save(tmp_path / "cal.json")
    assert QualityModel.load(path, "a" * 64, ["water", "forest"]).coef == model.coef
    with pytest.raises(InputError, match="another model"):
        QualityModel.load(path, "b" * 64, None)
    with pytest.raises(InputError, match="class list"):
        QualityModel.load(path, "a" * 64, ["water"])
    with pytest.raises(InputError, match=f"at least {MIN_CALIBRATION_TILES} labelled tiles"):
        fit_quality_model(signals[:5], truth[:5], None, ["water"])


def test_on_class_maps_corrupted_at_known_rates_predicted_quality_ranks_like_true_iou():
    """Tiles whose probabilities are the truth blended with noise at a known rate: the more noise, the
    more wrong pixels. The estimate, with no labels, must rank the tiles as their true IoU does."""
    from training.quality_calibration import _sharpness, tile_iou

    rng = np.random.default_rng(1)
    rows = []
    for rate in np.linspace(0.0, 0.9, 10):
        for _ in range(3):
            truth = np.zeros((64, 64), int)
            truth[:, 32:] = 1
            truth[40:, :20] = 2
            onehot = np.stack([truth == k for k in range(3)]).astype(np.float32)
            probs = (1 - rate) * onehot + rate * rng.dirichlet(np.ones(3), size=(64, 64)).transpose(2, 0, 1)
            probs = probs.astype(np.float32)
            predicted = probs.argmax(axis=0)
            margin, entropy = pixel_signals(probs)
            score = probs.max(axis=0)
            signals = [score.mean(), margin.mean(), entropy.mean(), _sharpness(score, predicted), np.nan]
            rows.append((signals, tile_iou(truth, predicted)))
    signals = np.array([r[0] for r in rows], float)
    truth_iou = np.array([r[1] for r in rows])
    agreement = rank_agreement(QualityModel().predict(signals), truth_iou)
    assert agreement["srocc"] > 0.8 and agreement["plcc"] > 0.7, agreement


def test_the_calibration_kept_is_the_one_that_ranks_the_tiles_best():
    from training.quality_calibration import choose, ranks_worse

    good, fair, poor, nan = ({"srocc": 0.8, "plcc": 0.7}, {"srocc": 0.5, "plcc": 0.6}, {"srocc": 0.5, "plcc": 0.2},
                             {"srocc": math.nan, "plcc": math.nan})
    assert ranks_worse(fair, good) and ranks_worse(poor, fair) and not ranks_worse(fair, poor)  # PLCC breaks ties
    assert not ranks_worse(nan, good) and not ranks_worse(good, nan)  # not measured: decides nothing
    assert choose({"new": good, "default": fair}) == "new"
    assert choose({"new": fair, "default": fair}) == "new"  # as good: the new one, fitted on these labels
    assert choose({"new": poor, "default": fair}) == "default"
    assert choose({"new": fair, "default": poor, "existing": good}) == "existing"
    assert choose({"new": poor, "default": good, "existing": fair}) == "default"
    assert choose({"new": poor, "default": fair, "existing": fair}) == "existing"  # a tie keeps the file
    # A new calibration whose ranking could not be measured is not known to rank them as well: it was written
    # with an intercept that made every polygon's quality 1.0 (or 0).
    assert choose({"new": nan, "default": good, "existing": good}) == "existing"
    assert choose({"new": nan, "default": good}) == "default"
    assert choose({"new": nan, "default": nan, "existing": good}) == "existing"


def test_a_calibration_that_ranks_the_tiles_worse_is_not_written_unless_forced(tiny_model, tmp_path, monkeypatch):
    """`evaluate --calibrate-quality` wrote its calibration even when, on the same tiles, it ranked them worse
    than the built-in estimate or the calibration it replaced. The better one is kept, one sentence says which,
    and the --json report records it; --force-calibration writes the new one anyway."""
    from training_data import make_synthetic

    import training.quality_calibration as fitting

    (tmp_path / "scene").mkdir()
    raster, labels, _ = make_synthetic(tmp_path / "scene", size=256, block=32)
    calibration, metrics = tmp_path / "quality.json", tmp_path / "metrics.json"

    def evaluate(*extra):
        result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                     str(tiny_model), "--calibrate-quality", "--quality-tile", "32", "--json",
                                     str(metrics), "--overwrite", "--quiet", *map(str, extra)])
        assert result.exit_code == 0, result.output
        summary = next(line for line in result.output.splitlines() if line.startswith("Quality estimate on"))
        return summary, json.loads(metrics.read_text())["quality_calibration"]

    summary, report = evaluate("--quality-out", calibration)
    assert summary.endswith(f"Calibration written to {calibration}.")
    assert report["kept"] == "new" and report["written"] and report["existing"] is None
    first = calibration.read_bytes()
    assert json.loads(first)["source"] == "calibrated"

    # The new calibration ranks the held-out tiles backwards (SROCC -1): the existing one is kept as it was ...
    monkeypatch.setattr(fitting, "out_of_fold", lambda signals, truth, *args: -truth)
    summary, report = evaluate("--quality-out", calibration)
    assert report["kept"] == "existing" and not report["written"] and report["calibrated"]["srocc"] == -1.0
    assert report["existing"]["srocc"] > -1.0 and "; existing SROCC " in summary
    assert summary.endswith(f"so {calibration} was kept as it was; add --force-calibration to replace it anyway.")
    assert calibration.read_bytes() == first
    # ... unless forced, which says so.
    summary, report = evaluate("--quality-out", calibration, "--force-calibration")
    assert report["kept"] == "new" and report["written"] and report["forced"]
    assert f"written to {calibration} anyway, as --force-calibration asks." in summary
    stored = json.loads(calibration.read_text())
    assert stored["metrics"]["out_of_fold"]["srocc"] == -1.0 and stored["metrics"]["replaced"] == report["existing"]
    # The forced file, fitted on these tiles, is judged by its held-out figures (-1), not re-scored on the tiles
    # it was fitted on; the built-in estimate ranks best, and the report says the forced file is still there.
    summary, report = evaluate("--quality-out", calibration)
    assert report["existing"]["srocc"] == -1.0 and report["existing_scored"].startswith("held out")
    assert report["kept"] == "default" and not report["written"] and report["file_at_target"] == "existing"
    assert f"{calibration}, which ranks them worse too" in summary
    # Without a calibration at its place, one worse than the built-in estimate is not written at all.
    fresh = tmp_path / "fresh.json"
    summary, report = evaluate("--quality-out", fresh)
    assert report["kept"] == "default" and not report["written"] and not fresh.exists()
    assert report["file_at_target"] == "none"
    assert summary.endswith("so nothing was written and segment keeps using the built-in estimate; add "
                            "--force-calibration to write it anyway.")
    assert report["default"]["srocc"] > -1.0
    # --force-calibration alone does nothing: refused, as every option without the one it works with.
    refused = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                  str(tiny_model), "--force-calibration"])
    assert refused.exit_code == 2 and "--force-calibration applies only with --calibrate-quality" in refused.output


def test_evaluate_calibrates_the_estimate_and_segment_uses_it(tiny_model, tmp_path, monkeypatch):
    from training_data import make_synthetic

    (tmp_path / "scene").mkdir()
    raster, labels, _ = make_synthetic(tmp_path / "scene", size=256, block=32)
    calibration = tmp_path / "quality.json"
    result = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                 str(tiny_model), "--calibrate-quality", "--quality-out", str(calibration),
                                 "--quality-tile", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "SROCC" in result.output and "PLCC" in result.output
    stored = json.loads(calibration.read_text())
    assert stored["source"] == "calibrated" and stored["metrics"]["tiles"] >= MIN_CALIBRATION_TILES
    assert stored["class_lines"] == ["forest", "sand", "water"]
    few = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                              str(tiny_model), "--calibrate-quality", "--quality-out", str(tmp_path / "few.json"),
                              "--quality-tile", "128", "--quiet"])
    assert few.exit_code == 2 and f"at least {MIN_CALIBRATION_TILES} labelled tiles" in few.output
    assert not (tmp_path / "few.json").exists()
    nowhere = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                  str(tiny_model), "--calibrate-quality", "--quiet"])
    assert nowhere.exit_code == 2 and "--quality-out" in nowhere.output
    # segment uses a named calibration when it fits the model and the class list, and refuses it otherwise.
    # Named relative to the working folder, the report still says which file it was.
    out = tmp_path / "seg.gpkg"
    monkeypatch.chdir(tmp_path)
    used = runner.invoke(app, ["segment", str(raster), "-c", "forest", "-c", "sand", "-c", "water", "--model",
                               str(tiny_model), "--quality-calibration", calibration.name, "--out", str(out),
                               "--quiet"])
    assert used.exit_code == 0, used.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["quality"]["calibration"] == report["options"]["quality_calibration"] == str(calibration)
    other = runner.invoke(app, ["segment", str(raster), "-c", "forest", "--model", str(tiny_model),
                                "--quality-calibration", str(calibration), "--out", str(tmp_path / "o.gpkg"),
                                "--quiet"])
    assert other.exit_code == 2 and "class list" in other.output and not (tmp_path / "o.gpkg").exists()


SAMPLE = Path(__file__).resolve().parents[2] / "resources" / "sample" / "naip_2020_5m_crop.tif"


@pytest.mark.parametrize("change, words", [
    ({"coef": [1, 2]}, "'coef' must be 5 finite numbers"),
    ({"coef": [float("nan")] * 5}, "'coef' must be 5 finite numbers"),
    ({"coef": ["1"] * 5}, "'coef' must be 5 finite numbers"),
    ({"coef": None}, "'coef' must be 5 finite numbers"),
    ({"coef": [[1]] * 5}, "'coef' must be 5 finite numbers"),
    ({"fill": [0.5]}, "'fill' must be 5 finite numbers"),
    ({"intercept": "x"}, "'intercept' must be a finite number"),
    ({"weights_sha256": 12}, "'weights_sha256' must be a text"),
    ({"class_lines": "water"}, "'class_lines' must be a list of class lines"),
    ({"weights_sha256": "0" * 64}, "was made for another model"),
    ({"class_lines": ["road", "forest"]}, "was made for the classes road; forest, not water; road"),
])
def test_a_calibration_segment_cannot_use_is_refused_before_the_dense_pass(change, words, tiny_model, tmp_path,
                                                                          monkeypatch):
    """A damaged or hand-edited calibration failed after the whole run with a traceback (or gave NULL quality
    everywhere without a word); one made for another model or class list was told only after the run."""
    def no_dense_pass(*args, **kwargs):
        raise AssertionError("the dense pass ran")

    monkeypatch.setattr("backend.engine.segment.predict_blocks", no_dense_pass)
    data = json.loads(QualityModel().save(tmp_path / "base.json").read_text(encoding="utf-8"))
    (tmp_path / "q.json").write_text(json.dumps(data | change), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(app, ["segment", str(SAMPLE), "-c", "water", "-c", "road", "--model", str(tiny_model),
                                      "--out", str(out / "r.gpkg"), "--quality-calibration", str(tmp_path / "q.json")])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert list(out.iterdir()) == []


def test_a_calibration_saved_with_a_byte_order_mark_is_read(tmp_path):
    saved = QualityModel(coef=[1.0, 2.0, -1.0, 1.0, 2.0]).save(tmp_path / "q.json")
    saved.write_bytes(b"\xef\xbb\xbf" + saved.read_bytes())
    assert QualityModel.load(saved).coef == [1.0, 2.0, -1.0, 1.0, 2.0]


def test_class_lists_match_whatever_their_order_letter_case_and_spacing_but_not_other_synonyms(tmp_path):
    """'grass,lawn' against 'grass, lawn', 'Building' against 'building' and the same classes in another order
    (evaluate writes them sorted) were refused, so "calibrate again with this class list" could not be followed."""
    assert same_classes(["grass,lawn", "Building"], ["building", "grass, lawn"])
    assert not same_classes(["grass, lawn", "building"], ["grass", "building"])
    assert not same_classes(["water"], ["water", "road"])
    path = QualityModel(class_lines=["road", "grass,lawn"]).save(tmp_path / "q.json")
    assert QualityModel.load(path, None, ["Grass, Lawn", "road"]).class_lines == ["road", "grass,lawn"]
    with pytest.raises(InputError, match="was made for the classes road; grass,lawn, not grass; road"):
        QualityModel.load(path, None, ["grass", "road"])


@pytest.mark.parametrize("key", ["coef", "intercept", "fill"])
def test_a_calibration_missing_a_coefficient_is_refused_not_completed_from_the_built_in_ones(tmp_path, key):
    data = json.loads(QualityModel().save(tmp_path / "q.json").read_text(encoding="utf-8"))
    del data[key]
    (tmp_path / "q.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError, match=f"is not usable: it has no '{key}'"):
        QualityModel.load(tmp_path / "q.json")


def test_a_models_own_calibration_for_other_classes_gives_the_built_in_estimate_and_says_so(tiny_model, tmp_path):
    """A fine-tuned model's quality_calibration.json was applied to any class list without a word (and named by a
    relative path), while the same file named with --quality-calibration was refused."""
    from training_data import make_synthetic

    (tmp_path / "scene").mkdir()
    raster, labels, _ = make_synthetic(tmp_path / "scene", size=256, block=32)
    model = tmp_path / "ft"
    trained = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out", str(model),
                                  "--base-model", str(tiny_model), "--epochs", "1", "--steps-per-epoch", "1",
                                  "--batch-size", "2", "--device", "cpu", "-q"])
    assert trained.exit_code == 0, trained.output
    QualityModel(coef=[1.0, 1.0, -1.0, 1.0, 1.0], class_lines=["forest", "sand", "water"]).save(
        calibration_path_for(model))
    runs = {}
    for name, classes in (("same", ["Water", "forest", "sand"]), ("other", ["water", "road"])):
        out = tmp_path / f"{name}.gpkg"
        result = runner.invoke(app, ["segment", str(raster), *[a for c in classes for a in ("-c", c)], "--model",
                                     str(model), "--out", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(out.with_suffix(".report.json").read_text())
    assert runs["same"]["quality"]["calibration"] == str(calibration_path_for(model).resolve())
    assert not any("quality calibration" in w for w in runs["same"]["warnings"])
    assert runs["other"]["quality"]["calibration"] == "default"
    said = [w for w in runs["other"]["warnings"] if "quality calibration" in w]
    assert said == [f"The model's quality calibration {calibration_path_for(model).resolve()} was fitted for the "
                    "classes forest; sand; water, not this run's, so the quality comes from the built-in estimate; "
                    "calibrate for these classes with farslip evaluate --calibrate-quality."]
