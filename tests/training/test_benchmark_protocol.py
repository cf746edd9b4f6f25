"""`farslip evaluate --benchmark` follows the paper's protocol: FarSLIP's thresholds by default, each
benchmark's own folder layout, and RS-OVSS's handling of images smaller than a crop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.errors import InputError
from backend.engine.models import load_model
from backend.engine.sliding import ArraySource, Segmenter, predict_window
from backend.engine.presets import parse_class_lines
from backend.service.cli import app
from training.evaluate import (
    benchmark_layout,
    benchmark_metrics,
    benchmark_pairs,
    benchmark_protocol,
    resized_to_long_side,
)

BENCHMARKS = ("openearthmap", "loveda", "potsdam", "vaihingen", "udd5", "vdd", "uavid", "isaid")
# How each official release lays out its evaluation split (image folder, label folder, image name, label name).
RELEASES = {
    "openearthmap": ("img_dir/val", "ann_dir/val", "aachen_1.tif", "aachen_1.tif"),
    "loveda": ("img_dir/val", "ann_dir/val", "2522.png", "2522.png"),
    "potsdam": ("img_dir/val", "ann_dir/val", "2_13_0_0_512_512.png", "2_13_0_0_512_512.png"),
    "vaihingen": ("img_dir/val", "ann_dir/val", "area2_0_0_512_512.png", "area2_0_0_512_512.png"),
    "udd5": ("val/src", "val/gt", "DJI_0538.JPG", "DJI_0538.png"),
    "vdd": ("test/src", "test/gt", "DJI_0001.JPG", "DJI_0001.png"),
    "uavid": ("img_dir/test", "ann_dir/test", "seq21_000400.png", "seq21_000400.png"),
    "isaid": ("img_dir/val", "ann_dir/val", "P0003_0_800_0_800.png", "P0003_0_800_0_800_instance_color_RGB.png"),
}
runner = CliRunner()


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_release(root: Path, preset: str, images: int = 2, size: tuple[int, int] = (96, 128)) -> Path:
    """A tiny copy of a benchmark's official layout: left half label 0 (dark), right half label 1."""
    image_dir, label_dir, image_name, label_name = RELEASES[preset]
    rng = np.random.default_rng(0)
    width = size[1]
    for index in range(images):
        label = np.zeros(size, np.uint8)
        label[:, width // 2:] = 1
        rgb = np.where(label[..., None] == 1, 200, 40) + rng.normal(0, 5, (*size, 3))
        prefix = f"{index}_" if index else ""
        _write(root / image_dir / (prefix + image_name), np.clip(rgb, 0, 255).astype(np.uint8))
        _write(root / label_dir / (prefix + label_name), label)
    # Files a careless reader would pick up: the other split and stray files in the folders.
    _write(root / image_dir.replace("val", "train").replace("test", "train") / image_name,
           np.zeros((8, 8, 3), np.uint8))
    (root / image_dir / "readme.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("preset", BENCHMARKS)
def test_each_benchmark_is_read_in_its_official_layout(preset, tmp_path):
    root = make_release(tmp_path / preset, preset)
    pairs = benchmark_pairs(root, benchmark_layout(preset))
    image_dir, label_dir, image_name, label_name = RELEASES[preset]
    assert sorted((p.relative_to(root).as_posix(), q.relative_to(root).as_posix()) for p, q in pairs) == sorted([
        (f"{image_dir}/{image_name}", f"{label_dir}/{label_name}"),
        (f"{image_dir}/1_{image_name}", f"{label_dir}/1_{label_name}"),
    ])


def test_uavid_and_vdd_evaluate_their_test_split_and_udd5_its_val_split():
    assert benchmark_layout("uavid").split == benchmark_layout("vdd").split == "test"
    assert benchmark_layout("udd5").split == "val"
    assert benchmark_layout("landcover") is None


def test_a_missing_label_or_folder_is_one_clear_sentence(tmp_path):
    root = make_release(tmp_path / "isaid", "isaid")
    (root / "ann_dir/val/1_P0003_0_800_0_800_instance_color_RGB.png").unlink()
    with pytest.raises(InputError, match=r"1_P0003_0_800_0_800_instance_color_RGB\.png is missing"):
        benchmark_pairs(root, benchmark_layout("isaid"))
    with pytest.raises(InputError, match=r"val/src under the dataset folder"):
        benchmark_pairs(root, benchmark_layout("udd5"))


def test_a_colour_label_image_is_refused(tiny_model, tmp_path):
    root = make_release(tmp_path / "isaid", "isaid", images=1)
    colour = np.zeros((96, 128, 3), np.uint8)
    colour[:, 64:] = (0, 0, 63)  # iSAID's raw colour coding instead of class indices
    _write(root / "ann_dir/val/P0003_0_800_0_800_instance_color_RGB.png", colour)
    with pytest.raises(InputError, match="class indices in one band"):
        benchmark_metrics(root, ["dark", "bright"], load_model(str(tiny_model)), benchmark_layout("isaid"))


def test_farslip_protocol_is_the_default_and_segearth_keeps_the_per_dataset_thresholds():
    assert benchmark_protocol("potsdam") == {"prob_threshold": 0.0, "background_index": 0,
                                             "reduce_zero_label": True}
    assert benchmark_protocol("potsdam", "segearth") == {"prob_threshold": 0.1, "background_index": 5,
                                                         "reduce_zero_label": True}
    assert benchmark_protocol("udd5", "segearth")["prob_threshold"] == 0.4
    assert benchmark_protocol("LoveDA")["reduce_zero_label"] is True
    assert benchmark_protocol(None) == {"prob_threshold": 0.0, "background_index": 0, "reduce_zero_label": False}
    with pytest.raises(InputError, match="needs one of the benchmark presets"):
        benchmark_protocol("landcover", "segearth")
    with pytest.raises(InputError, match="--protocol must be"):
        benchmark_protocol("potsdam", "mmseg")


def test_evaluate_benchmark_cli_uses_the_preset_layout_and_protocol(tiny_model, tmp_path):
    root = make_release(tmp_path / "UDD5", "udd5", images=1)

    def run(*extra):
        out = tmp_path / f"metrics{len(extra)}.json"
        result = runner.invoke(app, ["evaluate", "--benchmark", str(root), "--preset", "udd5", "--model",
                                     str(tiny_model), "--device", "cpu", "--quiet", "--json", str(out), *extra])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text()), result.output

    default, text = run()
    assert default["protocol"] == "farslip" and "threshold 0.0, background index 0" in text
    assert default["settings"] == {"prob_threshold": 0.0, "background_index": 0, "reduce_zero_label": False}
    assert default["metrics"]["images"] == 1 and default["metrics"]["pixels"] == 96 * 128
    segearth, _ = run("--protocol", "segearth")
    assert segearth["settings"]["prob_threshold"] == 0.4 and segearth["settings"]["background_index"] == 4
    # Only pixels above 0.4 keep their class: fewer or equal pixels of classes other than "other" (4).
    confusion = np.array(segearth["metrics"]["confusion"])
    assert confusion[:, :4].sum() <= np.array(default["metrics"]["confusion"])[:, :4].sum()
    refused = runner.invoke(app, ["evaluate", "--benchmark", str(root), "-c", "a", "-c", "b", "--model",
                                  str(tiny_model), "--device", "cpu", "--protocol", "segearth"])
    assert refused.exit_code == 2 and "needs one of the benchmark presets" in refused.output
    half = runner.invoke(app, ["evaluate", "--benchmark", str(root), "--preset", "udd5", "--model",
                               str(tiny_model), "--device", "cpu", "--half"])
    assert half.exit_code == 2 and "--half" in half.output and "CUDA GPU" in half.output


def rsovss_crop_logits(model, text, crop: torch.Tensor, patch: int) -> torch.Tensor:
    """RS-OVSS forward_slide + forward_feature for one crop smaller than 224 (written from its description)."""
    h, w = crop.shape[-2:]
    pad_w, pad_h = (-w) % patch, (-h) % patch
    left, top = pad_w // 2, pad_h // 2
    padded = F.pad(normalize_pixels(crop), (left, pad_w - left, top, pad_h - top))
    resized = F.interpolate(padded, size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = dense_patch_features(model.visual, resized)
    logits = torch.einsum("bhwd,qd->bqhw", features, text)
    logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[:, :, top:top + h, left:left + w]


@pytest.mark.parametrize("shape", [(150, 260), (100, 90)])
def test_benchmark_mode_pads_small_crops_centred_and_resizes_them_to_224(tiny_model, shape):
    loaded = load_model(str(tiny_model))
    segmenter = Segmenter(loaded, parse_class_lines(["water", "field", "road"]), batch_size=2)
    segmenter.keep_logits = True
    image = np.random.default_rng(4).uniform(0, 255, (3, *shape)).astype(np.float32)
    geodata = predict_window(segmenter, ArraySource(image)).logits
    segmenter.resize_small_crops = True
    benchmark = predict_window(segmenter, ArraySource(image)).logits
    # Reference: crops of min(224, side) on the stride-112 grid, each as RS-OVSS computes it.
    height, width = shape
    acc, count = torch.zeros(segmenter.num_queries, height, width), torch.zeros(height, width)
    starts = [max(min(i * 112 + 224, width) - 224, 0) for i in range(max(width - 112 - 1, 0) // 112 + 1)]
    for x in starts:
        x2 = min(x + 224, width)
        crop = torch.from_numpy(image[None, :, :, x:x2].copy())
        acc[:, :, x:x2] += rsovss_crop_logits(loaded.model, segmenter.text, crop, 16)[0]
        count[:, x:x2] += 1
    np.testing.assert_allclose(benchmark, (acc / count).numpy(), atol=1e-5)
    assert np.abs(benchmark - geodata).max() > 1e-3  # the geodata path interpolates positions instead


def test_benchmark_images_are_resized_like_mmcv_keep_ratio():
    rgb = np.random.default_rng(5).integers(0, 256, (3, 300, 500)).astype(np.uint8)
    resized = resized_to_long_side(rgb, 448)
    assert resized.shape == (1, 3, 269, 448)  # 300 * 0.896 = 268.8 -> int(x + 0.5)
    assert torch.equal(resized, resized.round())
    small = resized_to_long_side(rgb[:, :100, :150], 448)
    assert small.shape[-2:] == (299, 448)  # small images are enlarged, as mmcv does


def test_benchmark_metrics_reads_a_preset_layout(tiny_model, tmp_path):
    root = make_release(tmp_path / "VDD", "vdd")
    loaded = load_model(str(tiny_model))
    metrics = benchmark_metrics(root, ["dark", "bright"], loaded, benchmark_layout("vdd"))
    assert metrics["images"] == 2 and metrics["pixels"] == 2 * 96 * 128
