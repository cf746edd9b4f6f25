"""Fine-tuning end to end on CPU with a tiny model: mIoU rises, evaluate agrees, reload, resume, cancel."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from training_data import RASTER_CRS, fast_options, write_labels
from typer.testing import CliRunner

from backend.engine.errors import CancelledError, InputError
from backend.engine.models import load_model
from backend.engine.raster import PixelWindow, open_source
from backend.service.cli import app
from training.api import evaluate_model, train_model
from training.evaluate import predict_classes, segmenter_for


@pytest.fixture(scope="module")
def trained(synthetic, tiny_model, tmp_path_factory):
    raster, labels, _ = synthetic
    out = tmp_path_factory.mktemp("trained") / "colours"
    events = []
    result = train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=3, lr=1e-3,
                         options=fast_options(), progress=lambda s, t, info: events.append((s, t, info)))
    return result, out, events


def test_training_raises_held_out_miou_by_a_clear_margin(trained):
    result, _out, events = trained
    before, after = result["metrics"]["before"]["miou"], result["metrics"]["after"]["miou"]
    assert after > before + 0.3, (before, after)
    assert after > 0.7
    epochs = [info for _, _, info in events if info.get("phase") == "validate" and info.get("epoch")]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all("loss" in e and "val_miou" in e for e in epochs)
    steps = [s for s, _, info in events if info.get("phase") == "train"]
    assert steps == sorted(steps) and steps[-1] == events[-1][1]


def test_model_folder_holds_weights_metadata_and_checkpoint(trained, synthetic):
    result, out, _ = trained
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "farslip_model.json", "checkpoint", "evaluation.txt",
            "confusion_after.png"} <= names
    meta = json.loads((out / "farslip_model.json").read_text())
    assert meta["format"] == "farslip-finetuned/1"
    assert meta["class_lines"] == ["forest", "sand", "water"]
    assert len(meta["data"]["raster"]["sha256"]) == 64 and len(meta["data"]["labels"]["sha256"]) == 64
    assert meta["metrics"]["after"]["miou"] == result["metrics"]["after"]["miou"]
    assert meta["split"]["validation_window"]["height"] > 0
    assert meta["activation"] == "quickgelu"
    assert meta["distillation"]["teacher"] == "frozen"  # the default for small user data
    assert not list(out.parent.glob(".*partial"))


def test_evaluate_reports_the_same_figure_as_train(trained, synthetic):
    result, out, _ = trained
    raster, labels, _ = synthetic
    report = evaluate_model(raster, labels, "cls", model=str(out))
    assert report["split"] == "validation"
    assert report["metrics"]["miou"] == result["metrics"]["after"]["miou"]
    assert report["metrics"]["confusion"] == result["metrics"]["after"]["confusion"]
    everything = evaluate_model(raster, labels, "cls", model=str(out), split="all")
    assert everything["split"] == "all" and everything["metrics"]["pixels"] > report["metrics"]["pixels"]


def test_untrained_model_scores_the_before_figure(trained, synthetic, tiny_model):
    result, out, _ = trained
    raster, labels, _ = synthetic
    meta = json.loads((out / "farslip_model.json").read_text())
    window = PixelWindow(**meta["split"]["validation_window"])
    loaded = load_model(str(tiny_model))
    with open_source(raster) as source:
        segmenter = segmenter_for(loaded, meta["class_lines"])
        predicted = predict_classes(segmenter, source, window)
    from training.labels import build_label_grid, read_label_polygons

    with open_source(raster) as source:
        grid = build_label_grid(source, read_label_polygons(labels, "cls", source.crs))
    from training.evaluate import score

    rows = slice(window.row_off - grid.window.row_off, window.row_off - grid.window.row_off + window.height)
    cols = slice(window.col_off - grid.window.col_off, window.col_off - grid.window.col_off + window.width)
    assert score(grid.labels[rows, cols], predicted, grid.class_names)["miou"] == \
        result["metrics"]["before"]["miou"]


def test_saved_model_reloads_with_identical_outputs(trained):
    _, out, _ = trained
    first, second = load_model(str(out)), load_model(str(out))
    assert first.class_lines == ["forest", "sand", "water"]
    pixels = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(first.model.encode_image(pixels), second.model.encode_image(pixels))
    from backend.engine.dense import dense_patch_features

    with torch.no_grad():
        assert torch.equal(dense_patch_features(first.model.visual, pixels),
                           dense_patch_features(second.model.visual, pixels))


def test_resume_continues_from_the_last_epoch(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    out = tmp_path / "resumed"
    first = train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=1, lr=1e-3,
                        options=fast_options(steps_per_epoch=2))
    assert first["epochs"] == 1
    seen = []
    second = train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2, lr=1e-3,
                         options=fast_options(steps_per_epoch=2), resume=True,
                         progress=lambda s, t, info: seen.append(info))
    assert second["epochs"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert [i["epoch"] for i in seen if i.get("phase") == "train"] == [2, 2]
    assert second["metrics"]["before"] == first["metrics"]["before"]
    with pytest.raises(InputError, match="already ran 2 epochs"):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2, resume=True,
                    options=fast_options(steps_per_epoch=2))
    assert (out / "model.safetensors").is_file()


def test_an_interrupted_training_resumes_from_its_partial_folder(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    out = tmp_path / "interrupted"
    calls = {"n": 0}

    def fail_in_epoch_two(step, total, info):
        if info.get("phase") == "train" and info["epoch"] == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="--resume"):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2, lr=1e-3,
                    options=fast_options(steps_per_epoch=2), progress=fail_in_epoch_two)
    assert not out.exists()
    partial = tmp_path / ".interrupted.partial"
    assert (partial / "checkpoint" / "state.pt").is_file()
    result = train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2, lr=1e-3,
                         options=fast_options(steps_per_epoch=2), resume=True,
                         progress=lambda *a: calls.__setitem__("n", calls["n"] + 1))
    assert result["epochs"] == 2 and out.is_dir() and not partial.exists()


def test_cancel_leaves_no_model_directory(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    out = tmp_path / "cancelled"
    steps = {"n": 0}

    def cancel_after_a_few_steps() -> bool:
        steps["n"] += 1
        return steps["n"] > 5

    with pytest.raises(CancelledError):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=3,
                    options=fast_options(steps_per_epoch=2), should_cancel=cancel_after_a_few_steps)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(trained, synthetic, tiny_model):
    raster, labels, _ = synthetic
    _, out, _ = trained
    with pytest.raises(InputError, match="already exists"):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=1)


@pytest.mark.parametrize(("changes", "message"), [
    ({"class_field": "missing"}, "no field 'missing'"),
    ({"method": "adapter"}, "--method must be one of"),
    ({"epochs": 0}, "--epochs must be a whole number from 1 to 10000; got 0"),
])
def test_bad_training_input_gives_a_message(synthetic, tiny_model, tmp_path, changes, message):
    raster, labels, _ = synthetic
    args = {"class_field": "cls", "method": "lora", "epochs": 1, **changes}
    with pytest.raises(InputError, match=message):
        train_model(raster, labels, args.pop("class_field"), tmp_path / "m", base_model=str(tiny_model),
                    **args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["last-blocks", "full"])
def test_other_methods_train_and_save_a_plain_model(synthetic, tiny_model, tmp_path, method):
    raster, labels, _ = synthetic
    result = train_model(raster, labels, "cls", tmp_path / method, base_model=str(tiny_model), method=method,
                         epochs=1, lr=1e-4, options=fast_options(steps_per_epoch=2))
    loaded = load_model(str(tmp_path / method))
    assert loaded.class_lines == result["class_lines"]


def test_farslip_evaluate_and_train_commands(synthetic, tiny_model, tmp_path):
    """The `farslip` application itself (the registration users get), not a Typer app built here."""
    raster, labels, _ = synthetic
    runner = CliRunner()
    evaluated = runner.invoke(app, ["evaluate", str(raster), str(labels), "--class-field", "cls", "--model",
                                    str(tiny_model), "--device", "cpu", "--json", str(tmp_path / "m.json"),
                                    "--png", str(tmp_path / "m.png"), "-q"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "mIoU" in evaluated.output and (tmp_path / "m.png").is_file()
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["miou"] is not None
    trained = runner.invoke(app, ["train", str(raster), str(labels), "--class-field", "cls", "--out",
                                  str(tmp_path / "cli-model"), "--base-model", str(tiny_model), "--epochs", "1",
                                  "--steps-per-epoch", "2", "--batch-size", "2", "--device", "cpu", "-q"])
    assert trained.exit_code == 0, trained.output
    assert "Validation mIoU" in trained.output and (tmp_path / "cli-model" / "model.safetensors").is_file()


def test_installed_farslip_script_reports_a_bad_class_field_in_one_sentence(synthetic, tiny_model):
    raster, labels, _ = synthetic
    farslip = Path(sys.executable).parent / "farslip"
    bad = subprocess.run([str(farslip), "evaluate", str(raster), str(labels), "--class-field", "nope", "--model",
                          str(tiny_model), "--device", "cpu", "-q"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "no field 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_solaris_buildings_against_background_end_to_end(shared_data, tiny_model, tmp_path):
    raster = shared_data / "solaris_sample_geotiff.tif"
    labels = shared_data / "solaris_geotiff_labels.geojson"
    with pytest.raises(InputError, match="only one class"):
        evaluate_model(raster, labels, "building", model=str(tiny_model))
    report = evaluate_model(raster, labels, "building", model=str(tiny_model), background="ground",
                            class_names={"yes": "building"})
    assert report["class_lines"] == ["building", "ground"]
    assert report["metrics"]["pixels"] > 100_000 and report["metrics"]["miou"] is not None
    result = train_model(raster, labels, "building", tmp_path / "buildings", base_model=str(tiny_model),
                         epochs=1, lr=1e-3, background="ground", class_names={"yes": "building"},
                         options=fast_options(steps_per_epoch=2))
    split_pixels = result["split"]["validation_pixels"]
    assert split_pixels["building"] > 0 and split_pixels["ground"] > 0
    again = evaluate_model(raster, labels, "building", model=str(tmp_path / "buildings"),
                           class_names={"yes": "building"})
    assert again["split"] == "validation" and again["background"] == "ground"
    assert again["metrics"]["miou"] == result["metrics"]["after"]["miou"]
    assert np.isfinite(result["metrics"]["before"]["miou"])


def test_segment_with_a_fine_tuned_model_runs_at_its_training_resolution(trained, synthetic, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    from backend.engine.models import load_model
    from backend.engine.options import SegmentOptions
    from backend.engine.segment import segment_raster

    _result, out, _ = trained
    raster, _, _ = synthetic
    assert json.loads((out / "farslip_model.json").read_text())["processing"]["gsd_m"] == pytest.approx(2.0)
    # The same pixels at 1 m: the model was trained at 2 m, so segment resamples by 0.5 unless told otherwise.
    fine = tmp_path / "fine.tif"
    with rasterio.open(raster) as src:
        profile = dict(src.profile, transform=from_origin(500000, 5000000, 1.0, 1.0))
        with rasterio.open(fine, "w", **profile) as dst:
            dst.write(src.read())
    loaded = load_model(str(out))
    default = segment_raster(SegmentOptions(raster=fine, out=tmp_path / "a.gpkg"), loaded)
    assert default.report["processing_scale"] == pytest.approx(0.5)
    chosen = segment_raster(SegmentOptions(raster=fine, scale=1.0, out=tmp_path / "b.gpkg"), loaded)
    assert chosen.report["processing_scale"] == 1.0


def test_segment_warns_about_classes_a_fine_tuned_model_was_not_trained_on(trained, synthetic, tmp_path):
    from backend.service.cli import app

    _result, out, _ = trained
    raster, _, _ = synthetic
    runner = CliRunner()
    result = runner.invoke(app, ["segment", str(raster), "--model", str(out), "-c", "water, lake", "-c", "building",
                                 "--out", str(tmp_path / "mixed.gpkg"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "Warning: Model 'colours' was fine-tuned on forest, sand, water; 'building' is not among them" \
        in result.output
    report = json.loads((tmp_path / "mixed.report.json").read_text())
    assert len(report["warnings"]) == 1 and "'building'" in report["warnings"][0]
    trained_only = runner.invoke(app, ["segment", str(raster), "--model", str(out), "--out",
                                       str(tmp_path / "own.gpkg"), "--device", "cpu", "-q"])
    assert trained_only.exit_code == 0 and "Warning" not in trained_only.output


def test_a_model_trained_on_chosen_bands_is_run_on_those_bands(synthetic, trained, tiny_model, tmp_path):
    """--bands 4,3,2 at training: segment and evaluate use them too unless told otherwise, and say so
    when a raster lacks them (the default red, green, blue would show the model other colours)."""
    import rasterio

    from backend.engine.options import SegmentOptions
    from backend.engine.segment import segment_raster

    raster, labels, _ = synthetic
    four = tmp_path / "nir_first.tif"
    with rasterio.open(raster) as src:
        rgb = src.read()
        profile = dict(src.profile, count=4)
    with rasterio.open(four, "w", **profile) as dst:  # band 1 noise, then blue, green, red
        dst.write(np.random.default_rng(1).integers(0, 255, rgb.shape[1:], dtype=np.uint8), 1)
        dst.write(rgb[::-1], [2, 3, 4])
    out = tmp_path / "false_colour"
    train_model(four, labels, "cls", out, base_model=str(tiny_model), epochs=1, bands=[4, 3, 2],
                options=fast_options(steps_per_epoch=1))
    assert json.loads((out / "farslip_model.json").read_text())["processing"]["bands_chosen"] == [4, 3, 2]
    # A model trained on the raster's own red, green, blue records no choice.
    assert json.loads((trained[1] / "farslip_model.json").read_text())["processing"]["bands_chosen"] is None

    loaded = load_model(str(out))
    run = segment_raster(SegmentOptions(raster=four, out=tmp_path / "a.gpkg"), loaded)
    assert run.report["bands"] == [4, 3, 2]
    told = segment_raster(SegmentOptions(raster=four, bands=[2, 3, 4], out=tmp_path / "b.gpkg"), loaded)
    assert told.report["bands"] == [2, 3, 4]
    # evaluate on other data (--split all) reads the same bands (it stopped with UnboundLocalError once),
    # and so do classify, the search index and a training that starts from this model.
    assert evaluate_model(four, labels, "cls", loaded=loaded, split="all")["split"] == "all"
    from backend.engine.classify import ClassifyOptions, classify_raster
    from backend.engine.search_index import open_index

    tiles = classify_raster(four, ClassifyOptions(["forest", "sand", "water"], tile=128), tmp_path / "t.gpkg", loaded)
    assert tiles.report["bands"] == [4, 3, 2]
    with open_index(four, loaded) as index:
        assert index.levels[0].source.bands == [4, 3, 2]
    train_model(four, labels, "cls", tmp_path / "again", base_model=str(out), epochs=1,
                options=fast_options(steps_per_epoch=1))
    assert json.loads((tmp_path / "again" / "farslip_model.json").read_text())["processing"]["bands"] == [4, 3, 2]
    for refused in (lambda: segment_raster(SegmentOptions(raster=raster, out=tmp_path / "c.gpkg"), loaded),
                    lambda: evaluate_model(raster, labels, "cls", loaded=loaded, split="all")):
        with pytest.raises(InputError, match=r"trained on bands 4,3,2 of its raster, and synthetic.tif has 3 "
                                             r"band\(s\)\. Give --bands"):
            refused()
    assert not (tmp_path / "c.gpkg").exists()


def test_evaluate_scores_on_the_grid_and_area_the_model_was_trained_on(synthetic, tiny_model, tmp_path):
    """Trained at --scale 0.5 inside an --aoi: the default split gives train's own figure (the recorded
    strip on the recorded grid, AOI and background), and --split all runs at the trained resolution,
    as segment does."""
    raster, labels, _ = synthetic
    aoi = write_labels(tmp_path / "aoi.gpkg", [shapely.box(500000, 4999500, 500600, 5000000)], ["area"], RASTER_CRS)
    out = tmp_path / "coarse"
    result = train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=1, scale=0.5,
                         background="other", aoi=aoi, options=fast_options(steps_per_epoch=1))
    report = evaluate_model(raster, labels, "cls", model=str(out))
    assert report["split"] == "validation"
    assert report["metrics"]["confusion"] == result["metrics"]["after"]["confusion"]
    assert report["metrics"]["miou"] == result["metrics"]["after"]["miou"]
    everything = evaluate_model(raster, labels, "cls", model=str(out), split="all", background="other")
    assert everything["window"]["width"] <= 384 // 2  # 4 m pixels, not the raster's own 2 m


def test_a_grid_of_two_factors_is_recorded_and_evaluated_on(synthetic, tiny_model, tmp_path):
    """--gsd 4 on 2 x 4 m pixels halves the columns and keeps the rows: the model records both factors,
    and the default evaluation comes back to that grid (before, one factor was recorded and evaluate
    applied it to the rows too, so the validation strip did not fit)."""
    import pyogrio.raw
    import rasterio
    import shapely.affinity
    import shapely.ops
    from pyproj import Transformer

    raster, labels, _ = synthetic
    tall = tmp_path / "tall.tif"
    with rasterio.open(raster) as src:
        profile = src.profile
        profile["transform"] = src.transform @ rasterio.Affine.scale(1.0, 2.0)
        with rasterio.open(tall, "w", **profile) as dst:
            dst.write(src.read())
        origin_y = src.transform.f
    meta, _, wkb, fields = pyogrio.raw.read(labels)
    to_raster = Transformer.from_crs(meta["crs"], RASTER_CRS, always_xy=True)
    geometries = [shapely.affinity.scale(shapely.ops.transform(to_raster.transform, g), 1.0, 2.0,
                                         origin=(0, origin_y)) for g in shapely.from_wkb(wkb)]
    tall_labels = write_labels(tmp_path / "tall.gpkg", geometries, list(fields[0]), RASTER_CRS)
    out = tmp_path / "model"
    result = train_model(tall, tall_labels, "cls", out, base_model=str(tiny_model), epochs=1, gsd_m=4.0,
                         options=fast_options(steps_per_epoch=1))
    processing = json.loads((out / "farslip_model.json").read_text())["processing"]
    assert processing["scale"] == pytest.approx(0.5) and processing["scale_y"] == pytest.approx(1.0)
    report = evaluate_model(tall, tall_labels, "cls", model=str(out))
    assert report["split"] == "validation"
    assert report["metrics"]["confusion"] == result["metrics"]["after"]["confusion"]


def test_a_model_trained_on_its_rasters_own_grid_segments_that_grid(synthetic, tiny_model, tmp_path):
    """Trained without --scale/--gsd on a lon/lat raster at 60 degrees north (pixels twice as tall as wide
    on the ground), the model records its pixels' width as its resolution; segment and evaluate applied it
    as square ground pixels and doubled the rows of the very raster it was trained on."""
    import pyogrio.raw
    import rasterio
    import shapely.ops
    from pyproj import Transformer

    from backend.engine.options import SegmentOptions
    from backend.engine.segment import segment_raster

    raster, labels, _ = synthetic
    northern = tmp_path / "north.tif"
    degrees = rasterio.Affine(4e-5, 0, 10.0, 0, -4e-5, 60.0)
    with rasterio.open(raster) as src:
        utm, profile = src.transform, src.profile | {"crs": "EPSG:4326", "transform": degrees}
        with rasterio.open(northern, "w", **profile) as dst:
            dst.write(src.read())
    meta, _, wkb, fields = pyogrio.raw.read(labels)
    to_utm = Transformer.from_crs(meta["crs"], RASTER_CRS, always_xy=True)

    def to_degrees(x, y):
        cols, rows = (~utm) * (np.asarray(x), np.asarray(y))
        return degrees * (cols, rows)

    geometries = [shapely.ops.transform(to_degrees, shapely.ops.transform(to_utm.transform, g))
                  for g in shapely.from_wkb(wkb)]
    north_labels = write_labels(tmp_path / "north.gpkg", geometries, list(fields[0]), "EPSG:4326")
    out = tmp_path / "model"
    result = train_model(northern, north_labels, "cls", out, base_model=str(tiny_model), epochs=1,
                         options=fast_options(steps_per_epoch=1))
    loaded = load_model(str(out))
    run = segment_raster(SegmentOptions(raster=northern, out=tmp_path / "s.gpkg"), loaded)
    assert run.report["processing_scale"] == pytest.approx(1.0)
    assert (run.report["pixel_window"]["height"], run.report["pixel_window"]["width"]) == (384, 384)
    # The same through the CLI, which applies the model's defaults before segment_raster does.
    cli = CliRunner().invoke(app, ["segment", str(northern), "--model", str(out), "--out", str(tmp_path / "c.gpkg"),
                                   "-q"])
    assert cli.exit_code == 0, cli.output
    report = json.loads((tmp_path / "c.report.json").read_text())
    assert report["processing_scale"] == pytest.approx(1.0)
    assert (report["pixel_window"]["height"], report["pixel_window"]["width"]) == (384, 384)
    everything = evaluate_model(northern, north_labels, "cls", loaded=loaded, split="all")
    assert everything["window"]["width"] <= 384 and everything["window"]["height"] <= 384
    assert evaluate_model(northern, north_labels, "cls", loaded=loaded)["metrics"]["confusion"] == \
        result["metrics"]["after"]["confusion"]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_layer_model(synthetic, tiny_model, tmp_path_factory):
    """One epoch on layer `a` (class field `cls`) of a GeoPackage whose layer `b` and field `kind` hold the
    same polygons: what a resumed run may not change without a sentence."""
    import pyogrio.raw

    raster, labels, _ = synthetic
    meta, _, wkb, fields = pyogrio.raw.read(labels)
    folder = tmp_path_factory.mktemp("resume_checks")
    layered = folder / "layered.gpkg"
    for i, layer in enumerate(("a", "b")):
        pyogrio.raw.write(layered, wkb, [fields[0], fields[0]], ["cls", "kind"], layer=layer, driver="GPKG",
                          geometry_type="Polygon", crs=meta["crs"], append=i > 0)
    aoi = write_labels(folder / "aoi.gpkg", [shapely.box(500000, 4999500, 500600, 5000000)], ["area"], RASTER_CRS)
    out = folder / "model"
    train_model(raster, f"{layered}|layername=a", "cls", out, base_model=str(tiny_model), epochs=1,
                options=fast_options(steps_per_epoch=1))
    return out, layered, aoi


@pytest.mark.parametrize(("changes", "named"), [
    ({"bands": [3, 2, 1]}, "--bands 1,2,3 (now 3,2,1)"),
    ({"scale": 0.5}, "2 m pixels, --scale 1 (now 4 m, --scale 0.5)"),
    ({"gsd_m": 4.0}, "2 m pixels, --scale 1 (now 4 m, --scale 0.5)"),
    ({"class_field": "kind"}, "--class-field cls (now kind)"),
    ({"class_names": {"water": "lake"}}, "no --class-name (now --class-name water=lake)"),
    ({"background": "other"}, "no --background (now --background other)"),
    ({"aoi": "AOI", "background": "other"}, "no --background (now --background other) and no --aoi (now "
                                            "--aoi aoi.gpkg)"),
    ({"layer": "b"}, "the labels layer 'a' (now 'b')"),
])
def test_resume_refuses_other_training_data_by_name(two_layer_model, synthetic, tiny_model, changes, named):
    """--resume with other bands, grid, classes, background, AOI or layer than the checkpoint's would mix two
    trainings into one model and report (a "before" figure of other classes): refused, nothing touched."""
    out, layered, aoi = two_layer_model
    raster, _, _ = synthetic
    args = {"class_field": "cls", "layer": "a", **changes}
    labels = f"{layered}|layername={args.pop('layer')}"
    if args.get("aoi") == "AOI":
        args["aoi"] = aoi
    before = _folder_bytes(out)
    with pytest.raises(InputError) as refused:
        train_model(raster, labels, args.pop("class_field"), out, base_model=str(tiny_model), epochs=2,
                    resume=True, options=fast_options(steps_per_epoch=1), **args)
    assert str(refused.value) == (f"The training in {out} was made with {named}; resume it with the same options "
                                  "(only --epochs may grow), or start over with --overwrite instead of --resume.")
    assert _folder_bytes(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["aoi.gpkg", "layered.gpkg", "model"]


@pytest.mark.parametrize(("changes", "named"), [({"lr": 0.05}, "--lr 0.01 (now 0.05)"),
                                                ({"steps_per_epoch": 3}, "--steps-per-epoch 1 (now 3)"),
                                                ({"seed": 7}, "--seed 0 (now 7)")])
def test_resume_refuses_another_learning_rate_or_schedule_and_records_the_rate_it_used(
        two_layer_model, synthetic, tiny_model, tmp_path, changes, named):
    """A resumed run continues with its first run's optimiser: another --lr, --steps-per-epoch or --seed was
    replaced without a word, and the model recorded the default rate instead of the one used."""
    import dataclasses

    _, layered, _ = two_layer_model
    raster, _, _ = synthetic
    options = fast_options(steps_per_epoch=1)
    base = dataclasses.replace(options, lr=0.01)
    train_model(raster, f"{layered}|layername=a", "cls", tmp_path / "fast", base_model=str(tiny_model), epochs=1,
                options=base)
    before = _folder_bytes(tmp_path / "fast")
    with pytest.raises(InputError, match=rf"was made with {re.escape(named)}; a resumed run continues"):
        train_model(raster, f"{layered}|layername=a", "cls", tmp_path / "fast", base_model=str(tiny_model),
                    epochs=2, resume=True, options=dataclasses.replace(base, **changes))
    assert _folder_bytes(tmp_path / "fast") == before
    # Left out (the defaults), they come from the checkpoint, and the record says the rate that was used.
    train_model(raster, f"{layered}|layername=a", "cls", tmp_path / "fast", base_model=str(tiny_model), epochs=2,
                resume=True, options=dataclasses.replace(options, steps_per_epoch=None))
    record = json.loads((tmp_path / "fast" / "farslip_model.json").read_text())["training"]
    assert record["lr"] == 0.01 and record["learning_rate"] == 0.01 and record["steps_per_epoch"] == 1


def test_evaluate_scores_another_layer_or_field_of_the_same_file_as_other_data(two_layer_model, synthetic):
    """A model trained on layer `a` (field `cls`) of a GeoPackage: evaluating layer `b` of the same file, or
    field `kind`, compared only the file's sha256 and took them for the training's own labels (the recorded
    validation strip then did not fit, or another layer was scored as held-out)."""
    out, layered, _ = two_layer_model
    raster, _, _ = synthetic
    assert evaluate_model(raster, f"{layered}|layername=a", "cls", model=str(out))["split"] == "validation"
    assert evaluate_model(raster, f"{layered}|layername=b", "cls", model=str(out))["split"] == "all"
    assert evaluate_model(raster, f"{layered}|layername=a", "kind", model=str(out))["split"] == "all"
    with pytest.raises(InputError, match="--split validation needs a fine-tuned model trained on this raster"):
        evaluate_model(raster, f"{layered}|layername=b", "cls", model=str(out), split="validation")


def test_farslip_train_resume_refuses_other_bands_and_classes_and_takes_more_epochs(synthetic, tiny_model,
                                                                                    tmp_path):
    raster, labels, _ = synthetic
    out = tmp_path / "model"
    common = [str(raster), str(labels), "--class-field", "cls", "--out", str(out), "--base-model",
              str(tiny_model), "--steps-per-epoch", "1", "--batch-size", "2", "--device", "cpu", "-q"]
    runner = CliRunner()
    assert runner.invoke(app, ["train", *common, "--epochs", "1"]).exit_code == 0
    before = _folder_bytes(out)
    mixed = runner.invoke(app, ["train", *common, "--epochs", "2", "--resume", "--bands", "3,2,1",
                                "--class-name", "water=lake"])
    assert mixed.exit_code == 2, mixed.output
    assert mixed.output.strip().splitlines() == [
        f"Error: The training in {out} was made with no --class-name (now --class-name water=lake) and --bands "
        "1,2,3 (now 3,2,1); resume it with the same options (only --epochs may grow), or start over with "
        "--overwrite instead of --resume."]
    assert _folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # What the sentence advises to start over works (in a copy: the rest of this test resumes `out`).
    again = tmp_path / "again"
    shutil.copytree(out, again)
    over = runner.invoke(app, ["train", *[str(again) if a == str(out) else a for a in common], "--epochs", "1",
                               "--overwrite", "--bands", "3,2,1", "--class-name", "water=lake"])
    assert over.exit_code == 0, over.output
    assert "lake" in json.loads((again / "farslip_model.json").read_text())["class_lines"]
    shutil.rmtree(again)

    # The same data spelt out (the raster's own bands) continues with more epochs.
    more = runner.invoke(app, ["train", *common, "--epochs", "2", "--resume", "--bands", "1,2,3"])
    assert more.exit_code == 0, more.output
    meta = json.loads((out / "farslip_model.json").read_text())
    assert meta["training"]["epochs_run"] == 2 and meta["class_lines"] == ["forest", "sand", "water"]

    # A checkpoint written before these were recorded still resumes (only the data files are compared).
    state = out / "checkpoint" / "state.pt"
    saved = torch.load(state, map_location="cpu", weights_only=True)
    saved["data"] = {"raster": saved["data"]["raster"], "labels": saved["data"]["labels"]}
    torch.save(saved, state)
    older = runner.invoke(app, ["train", *common, "--epochs", "3", "--resume"])
    assert older.exit_code == 0, older.output
    assert json.loads((out / "farslip_model.json").read_text())["training"]["epochs_run"] == 3


def test_an_interrupted_training_is_not_resumed_on_other_bands(synthetic, tiny_model, tmp_path):
    raster, labels, _ = synthetic
    out = tmp_path / "interrupted"

    def fail_in_epoch_two(step, total, info):
        if info.get("phase") == "train" and info["epoch"] == 2:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="--resume"):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2,
                    options=fast_options(steps_per_epoch=1), progress=fail_in_epoch_two)
    partial = tmp_path / ".interrupted.partial"
    kept = _folder_bytes(partial)
    with pytest.raises(InputError, match=r"^The training in .*\.interrupted\.partial was made with --bands 1,2,3 "
                                         r"\(now 3,2,1\);"):
        train_model(raster, labels, "cls", out, base_model=str(tiny_model), epochs=2, bands=[3, 2, 1],
                    resume=True, options=fast_options(steps_per_epoch=1))
    assert _folder_bytes(partial) == kept and not out.exists()


def test_resume_names_a_changed_area_of_interest_and_validation_strip():
    """Differences the cases above do not reach: the same AOI file edited since, another of its layers, and a
    server request's validation strip; a checkpoint recorded before these keys compares none of them."""
    from dataclasses import asdict

    from training.api import training_data_differences
    from training.finetune import TrainOptions

    then = {"raster": "r", "labels": "l", "aoi": {"path": "/data/aoi.gpkg", "sha256": "1", "layer": "area"}}
    saved_options = asdict(TrainOptions())
    edited = {**then, "aoi": {"path": "/data/aoi.gpkg", "sha256": "2", "layer": "area"}}
    assert training_data_differences(then, saved_options, edited, TrainOptions()) == (
        "--aoi aoi.gpkg as it was then (its sha256 differs now)")
    other_layer = {**then, "aoi": {"path": "/data/aoi.gpkg", "sha256": "1", "layer": "fields"}}
    assert training_data_differences(then, saved_options, other_layer, TrainOptions(validation_fraction=0.3)) == (
        "the --aoi layer 'area' (now 'fields') and a validation fraction of 0.2 (now 0.3)")
    assert training_data_differences({"raster": "r", "labels": "l"}, {}, edited, TrainOptions(buffer_px=8)) == ""


def test_another_resolution_scores_all_labelled_pixels_and_says_why(trained, synthetic):
    """The held-out strip lies on the pixel grid the model was trained on: evaluated at another --scale/--gsd it
    no longer marks those pixels, so auto scores every labelled pixel and says so (it cut the recorded window
    out of the other grid and called training pixels the validation strip); --split validation is refused."""
    _result, out, _ = trained
    raster, labels, _ = synthetic
    for resolution in ({"scale": 1.3}, {"gsd_m": 3.0}):
        report = evaluate_model(raster, labels, "cls", model=str(out), **resolution)
        assert report["split"] == "all", resolution
        assert any("held-out strip" in w and "all labelled pixels" in w for w in report["warnings"]), report
        with pytest.raises(InputError, match="--split validation scores the held-out strip on the pixel grid"):
            evaluate_model(raster, labels, "cls", model=str(out), split="validation", **resolution)
    same = evaluate_model(raster, labels, "cls", model=str(out), scale=1.0)  # the training's own grid
    assert same["split"] == "validation" and not any("held-out strip" in w for w in same["warnings"])


def test_a_rename_of_a_label_value_the_labels_do_not_hold_is_refused(trained, synthetic, tmp_path):
    """--class-name Sand=x on labels holding 'sand': the class stayed 'sand' while the model recorded the rename."""
    _result, out, _ = trained
    raster, labels, _ = synthetic
    with pytest.raises(InputError, match=r"renames the label value 'Sand', which no feature of .* holds .*'sand'"):
        evaluate_model(raster, labels, "cls", model=str(out), class_names={"Sand": "x"}, split="all")
    with pytest.raises(InputError, match="renames the label value 'Sand'"):
        train_model(raster, labels, "cls", tmp_path / "m", base_model=str(out), epochs=1,
                    class_names={"Sand": "x"}, options=fast_options(steps_per_epoch=1))
    assert not (tmp_path / "m").exists()


def test_label_classes_a_fine_tuned_model_was_not_trained_on_are_named(trained, synthetic, tmp_path):
    """As segment names typed classes the model was not fine-tuned on, evaluate names such label classes."""
    _result, out, _ = trained
    raster, labels, _ = synthetic
    report = evaluate_model(raster, labels, "cls", model=str(out), class_names={"forest": "tree"}, split="all")
    [said] = [w for w in report["warnings"] if "was fine-tuned on" in w]
    assert "'tree'" in said and "'sand'" not in said, said
    plain = evaluate_model(raster, labels, "cls", model=str(out))
    assert not any("was fine-tuned on" in w for w in plain["warnings"])


def test_a_training_that_never_beat_the_base_model_says_the_folder_holds_the_base_weights(synthetic, tiny_model,
                                                                                         tmp_path):
    """"best epoch 0 of 1" was all it said: no epoch scored above the base model, so the folder holds its weights."""
    raster, labels, _ = synthetic
    events = []
    result = train_model(raster, labels, "cls", tmp_path / "m", base_model=str(tiny_model), epochs=1, lr=1e-12,
                         options=fast_options(steps_per_epoch=1),
                         progress=lambda s, t, info: events.append(info))
    assert result["best_epoch"] == 0
    [said] = [w for w in result["warnings"] if "scored above the base model" in w]
    assert "holds the base model's weights" in said and str(tmp_path / "m") in said
    assert {"phase": "warning", "message": said} in events
