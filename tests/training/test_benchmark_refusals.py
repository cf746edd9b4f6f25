"""`farslip evaluate --benchmark` refuses, in one sentence and before anything is written, what would make its
mIoU differ from mmsegmentation's or silently ignore what the user asked for; its --json report records what
changes the numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from backend.service.cli import app

runner = CliRunner()


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, images: int = 2, size: tuple[int, int] = (64, 80), values=(0, 1)) -> Path:
    """images/ + labels/: the left part of each label is values[0], the right part values[1]."""
    rng = np.random.default_rng(0)
    for index in range(images):
        label = np.full(size, values[0], np.uint8)
        label[:, size[1] // 2:] = values[1]
        rgb = np.clip(np.where(label[..., None] == values[1], 200, 40) + rng.normal(0, 5, (*size, 3)), 0, 255)
        _write(root / "images" / f"im{index}.png", rgb.astype(np.uint8))
        _write(root / "labels" / f"im{index}.png", label)
    return root


def evaluate(tiny_model, root: Path, *extra: str, json_out: Path | None = None):
    args = ["evaluate", "--benchmark", str(root), "--model", str(tiny_model), "--device", "cpu", *extra]
    if json_out is not None:
        args += ["--json", str(json_out)]
    return runner.invoke(app, args)


def refused(result, *pieces: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for piece in pieces:
        assert piece in result.output, result.output


def test_label_values_outside_the_class_list_are_refused(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b3", values=(0, 4))
    out = tmp_path / "m.json"
    result = evaluate(tiny_model, root, "-c", "a", "-c", "b", "-c", "c", "-c", "d", json_out=out)
    refused(result, "label value 4 in", "im0.png", "is not a class index 0..3 nor the ignore index 255",
            "(4 classes, in label value order)")
    assert not out.exists()
    # 255 is a label value like another when the ignore index is something else.
    root = make_folder(tmp_path / "b255", values=(0, 255))
    result = evaluate(tiny_model, root, "-c", "a", "-c", "b", "--ignore-index", "7")
    refused(result, "label value 255 in", "nor the ignore index 7")
    # With --reduce-zero-label, 0 is ignored and 1..C are the classes.
    root = make_folder(tmp_path / "bz", values=(0, 3))
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", "--reduce-zero-label"),
            "label value 3 in", "is not a class value 1..2")
    ok = evaluate(tiny_model, root, "-c", "a", "-c", "b", "-c", "c", "--reduce-zero-label", "--quiet")
    assert ok.exit_code == 0, ok.output


def test_a_blank_class_or_classes_with_a_preset_are_refused(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b", values=(0, 2))
    out = tmp_path / "m.json"
    refused(evaluate(tiny_model, root, "-c", "a", "-c", " ", "-c", "c", json_out=out), "class 2 is blank")
    refused(evaluate(tiny_model, root, "-c", "a", "--preset", "potsdam", json_out=out),
            "Give --classes or --preset, not both")
    assert not out.exists()


def test_an_image_and_its_label_of_different_sizes_are_refused(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b", values=(0, 1))
    out = tmp_path / "m.json"
    _write(root / "labels" / "im1.png", np.zeros((80, 64), np.uint8))  # transposed
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", json_out=out),
            "im1.png is 80x64 pixels but its label", "is 64x80")
    _write(root / "labels" / "im1.png", np.zeros((32, 40), np.uint8))  # half the size
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", json_out=out), "is 40x32")
    assert not out.exists()


def test_images_without_a_label_are_refused_in_the_images_labels_layout(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b", images=3, values=(0, 1))
    (root / "labels" / "im1.png").unlink()
    out = tmp_path / "m.json"
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", json_out=out), "1 image(s) in", "have no label",
            "im1.png")
    assert not out.exists()


@pytest.mark.parametrize("extra, sentence", [
    (["--limit", "0"], "--limit must be 1 or more"),
    (["--limit", "-1"], "--limit must be 1 or more"),
    (["--long-side", "-5"], "--long-side must be a number of pixels"),
    (["--prob-threshold", "1.5"], "--prob-threshold is a probability, from 0 to 1"),
    (["--prob-threshold", "-0.1"], "--prob-threshold is a probability, from 0 to 1"),
    (["--ignore-index", "256"], "--ignore-index must be a label value from 0 to 255"),
    (["--ignore-index", "-1"], "--ignore-index must be a label value from 0 to 255"),
])
def test_benchmark_numbers_out_of_range_are_refused(tiny_model, tmp_path, extra, sentence):
    root = make_folder(tmp_path / "b", values=(0, 1))
    out = tmp_path / "m.json"
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", *extra, json_out=out), sentence)
    assert not out.exists()


@pytest.mark.parametrize("extra, sentence", [
    (["--scale", "2"], "--scale applies only to RASTER and LABELS, not with --benchmark FOLDER"),
    (["--bands", "1,2,3"], "--bands applies only to RASTER and LABELS"),
    (["--split", "auto"], "--split applies only to RASTER and LABELS"),
    (["--class-field", "kind"], "--class-field applies only to RASTER and LABELS"),
    (["--class-name", "1=b"], "--class-name applies only to RASTER and LABELS"),
    (["--scale", "2", "--bands", "1,2,3"], "--bands and --scale apply only to RASTER and LABELS"),
    (["x.tif"], "RASTER is not read with --benchmark FOLDER"),
])
def test_raster_mode_options_are_refused_with_benchmark(tiny_model, tmp_path, extra, sentence):
    root = make_folder(tmp_path / "b", values=(0, 1))
    out = tmp_path / "m.json"
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", *extra, json_out=out), sentence)
    assert not out.exists()


def test_the_json_report_records_what_changes_the_numbers(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b", images=3, values=(0, 1))
    out = tmp_path / "m.json"
    result = evaluate(tiny_model, root, "-c", "dark, black", "-c", "bright", "--long-side", "64", "--limit", "2",
                      "--ignore-index", "9", "--prob-threshold", "0.5", "--batch-size", "3", "--quiet",
                      json_out=out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["dataset"] == str(root.resolve())
    assert report["long_side"] == 64 and report["ignore_index"] == 9 and report["reduce_zero_label"] is False
    assert report["limit"] == 2 and report["batch_size"] == 3 and report["attention"] == "segearth"
    assert report["device"] == "cpu" and report["split"] is None
    assert report["class_lines"] == ["dark, black", "bright"]
    assert report["classes"][0] == {"class": "dark", "queries": ["dark", "black"]}
    assert report["images"] == 2 and report["image_names"] == ["images/im0.png", "images/im1.png"]
    assert report["protocol"] == "farslip, --prob-threshold 0.5 instead of its 0.0"
    assert report["protocol_overrides"] == {"prob_threshold": {"given": 0.5, "protocol": 0.0}}


def test_progress_lines_name_the_image(tiny_model, tmp_path):
    root = make_folder(tmp_path / "b", images=2, values=(0, 1))
    result = evaluate(tiny_model, root, "-c", "a", "-c", "b")
    assert result.exit_code == 0, result.output
    assert "image 1/2 (im0.png)" in result.output and "image 2/2 (im1.png)" in result.output
    assert "None:" not in result.output


@pytest.mark.parametrize("reader", ["opencv", "gdal"])
def test_unreadable_or_16_bit_benchmark_images_are_refused_before_the_model_runs(tiny_model, tmp_path, monkeypatch,
                                                                                 reader):
    """An empty or damaged PNG was a traceback (exit 1), the image's only after the model had run on the others;
    a 16-bit image was clipped to white and scored without a word. OpenCV (the benchmarks extra) reads a 16-bit
    image as mmsegmentation does (scaled to 8-bit; test_benchmark_parity); GDAL, without it, refuses it."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr("training.evaluate.predict_window", no_model)
    if reader == "gdal":
        monkeypatch.setattr("training.evaluate.opencv", lambda: None)
    else:
        pytest.importorskip("cv2")
    out = tmp_path / "m.json"
    for damaged, cut in (("labels/im1.png", 0), ("images/im1.png", 0), ("images/im1.png", 14)):
        root = make_folder(tmp_path / f"{damaged.replace('/', '-')}-{cut}")
        # Empty, or only its signature left (libpng: Read Error once the pixels are read).
        (root / damaged).write_bytes((root / damaged).read_bytes()[:cut])
        refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", json_out=out),
                f"{damaged} cannot be read as an image (it is empty, damaged")
    if reader == "opencv":
        return
    root = make_folder(tmp_path / "deep")
    (root / "images" / "im1.png").unlink()
    rgb16 = (np.arange(64 * 80 * 3, dtype=np.uint16).reshape(64, 80, 3) * 13)
    import rasterio

    with rasterio.open(root / "images" / "im1.tif", "w", driver="GTiff", width=80, height=64, count=3,
                       dtype="uint16") as ds:
        ds.write(np.moveaxis(rgb16, -1, 0))
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b", json_out=out),
            "im1.tif is uint16, not 8-bit: the benchmarks' images are 8-bit", "farslip-qgis[benchmarks]")
    assert not out.exists()


def test_a_missing_folder_two_labels_of_one_image_and_hidden_files_are_told_or_left_out(tiny_model, tmp_path):
    """A missing folder was 'No image/label pairs found in' it; im0.png and im0.tif as labels were resolved by
    directory order; a macOS ._im0.png counted as an image without a label."""
    refused(evaluate(tiny_model, tmp_path / "nowhere", "-c", "a", "-c", "b"),
            f"The benchmark folder {tmp_path / 'nowhere'} does not exist")
    root = make_folder(tmp_path / "b")
    (root / "labels" / "im0.tif").write_bytes((root / "labels" / "im0.png").read_bytes())
    refused(evaluate(tiny_model, root, "-c", "a", "-c", "b"), "holds two labels named im0 (im0.png, im0.tif)")
    (root / "labels" / "im0.tif").unlink()
    (root / "images" / "._im0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata, not an image
    result = evaluate(tiny_model, root, "-c", "a", "-c", "b")
    assert result.exit_code == 0, result.output
