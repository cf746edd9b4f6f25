"""`farslip evaluate --benchmark` reads images and labels as mmsegmentation does, checked against a few lines
that use OpenCV and PIL directly as mmcv does (not against the tool's own functions).

Before: images were decoded by GDAL and resized by torch (float bilinear, rounded), so about one value in ten
differed by 1 from mmcv's cv2.resize and JPEG decoding differed, moving IoUs by up to 1e-3; a palette image was
scored on its palette indices; with --reduce-zero-label, --ignore-index N ignored the raw label value N where
mmsegmentation ignores N after the reduction (raw N+1)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

# The benchmarks extra (opencv-python-headless, installed by `make setup`) is the reference: without it these
# tests fail rather than skip.
import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from backend.engine.models import load_model
from backend.service.cli import app
from training.evaluate import benchmark_metrics

runner = CliRunner()


def mmcv_input(path: Path, long_side: int) -> np.ndarray:
    """(3, h, w) RGB as RS-OVSS's pipeline feeds the model: LoadImageFromFile (cv2 IMREAD_COLOR), keep-ratio
    Resize to (long_side, long_side) (mmcv.imrescale: cv2 INTER_LINEAR), the preprocessor's BGR -> RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if long_side:
        height, width = bgr.shape[:2]
        factor = min(long_side / max(height, width), long_side / min(height, width))
        size = (int(width * factor + 0.5), int(height * factor + 0.5))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    return bgr[..., ::-1].transpose(2, 0, 1)


def palette_png(path: Path, indices: np.ndarray, seed: int) -> None:
    """An indexed-colour PNG whose colours are not its indices."""
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(np.random.default_rng(seed).integers(0, 256, 256 * 3).astype(np.uint8).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


KINDS = ("rgb.png", "jpeg.jpg", "palette.png", "grey.png", "grey_alpha.png", "rgba.png", "16bit.png")


def make_folder(root: Path, kinds: tuple[str, ...] = KINDS, size: tuple[int, int] = (61, 93)) -> Path:
    """images/ + labels/: images of the given kinds (an RGB PNG, a JPEG, a palette PNG, a grey PNG, a
    grey+alpha PNG, an RGBA PNG, a 16-bit grey PNG), each with a palette PNG label of values 0..2."""
    rng = np.random.default_rng(3)
    height, width = size
    smooth = np.stack(np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height)))
    rgb = np.clip(255 * np.stack([smooth[0], smooth[1], smooth.mean(0)], -1) + rng.normal(0, 20, (*size, 3)),
                  0, 255).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    writers = {
        "rgb.png": lambda path: Image.fromarray(rgb).save(path),
        "jpeg.jpg": lambda path: Image.fromarray(rgb).save(path, quality=80),
        "palette.png": lambda path: palette_png(path, rng.integers(0, 256, size), seed=1),
        "grey.png": lambda path: Image.fromarray(rgb[..., 1]).save(path),
        "grey_alpha.png": lambda path: Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 2]])).save(path),
        "rgba.png": lambda path: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path),
        "16bit.png": lambda path: Image.fromarray(rgb[..., 2].astype(np.uint16) * 256 + 100).save(path),
    }
    for kind in kinds:
        writers[kind](root / "images" / kind)
        palette_png(root / "labels" / f"{kind.split('.')[0]}.png", rng.integers(0, 3, size), seed=2)
    return root


class FakeModel:
    """predict_window's stand-in: records the pixels the model would get and predicts a fixed pattern."""

    def __init__(self, num_classes: int):
        self.num_classes, self.inputs = num_classes, []

    @staticmethod
    def pattern(height: int, width: int, num_classes: int) -> np.ndarray:
        rows, cols = np.mgrid[:height, :width]
        return (cols // 5 + rows // 7) % num_classes

    def __call__(self, segmenter, source, **kwargs):
        self.inputs.append(source.rgb.copy())
        classes = self.pattern(source.height, source.width, self.num_classes)
        logits = (np.arange(self.num_classes)[:, None, None] == classes[None]).astype(np.float32)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("long_side", [448, 0])
@pytest.mark.parametrize("kind", KINDS)
def test_benchmark_images_reach_the_model_as_mmcv_decodes_and_resizes_them(tiny_model, tmp_path, monkeypatch,
                                                                           kind, long_side):
    root = make_folder(tmp_path / "b", (kind,))
    fake = FakeModel(3)
    monkeypatch.setattr("training.evaluate.predict_window", fake)
    metrics = benchmark_metrics(root, ["a", "b", "c"], load_model(str(tiny_model)), long_side=long_side or None)
    assert metrics["image_reader"] == f"opencv {cv2.__version__}"
    (given,) = fake.inputs
    expected = mmcv_input(root / "images" / kind, long_side)
    assert given.shape == expected.shape
    assert np.array_equal(given, expected), f"{int((given != expected).sum())} of {given.size} values differ"


def test_without_opencv_a_palette_image_is_its_colours_and_a_notice_says_figures_may_differ(tiny_model, tmp_path,
                                                                                          monkeypatch):
    # GDAL decodes JPEGs its own way; a 16-bit image is refused without OpenCV.
    root = make_folder(tmp_path / "b", ("rgb.png", "palette.png", "grey.png", "grey_alpha.png", "rgba.png"))
    monkeypatch.setattr("training.evaluate.opencv", lambda: None, raising=False)
    fake = FakeModel(3)
    monkeypatch.setattr("training.evaluate.predict_window", fake)
    metrics = benchmark_metrics(root, ["a", "b", "c"], load_model(str(tiny_model)), long_side=None)
    for path, given in zip(sorted((root / "images").iterdir()), fake.inputs):
        assert np.array_equal(given, mmcv_input(path, 0)), path.name
    assert metrics["image_reader"] == "gdal (OpenCV not installed)"

    for quiet in ([], ["--quiet"]):  # said even with --quiet, as warnings are
        result = runner.invoke(app, ["evaluate", "--benchmark", str(root), "-c", "a", "-c", "b", "-c", "c",
                                     "--model", str(tiny_model), "--device", "cpu", "--long-side", "0", *quiet])
        assert result.exit_code == 0, result.output
        notices = [line for line in result.output.splitlines() if "OpenCV is not installed" in line]
        assert len(notices) == 1, result.output
        assert "may differ from mmsegmentation's in the last digits" in notices[0]
        assert "farslip-qgis[benchmarks]" in notices[0]


def test_with_opencv_there_is_no_notice(tiny_model, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "b")
    monkeypatch.setattr("training.evaluate.predict_window", FakeModel(3))
    result = runner.invoke(app, ["evaluate", "--benchmark", str(root), "-c", "a", "-c", "b", "-c", "c", "--model",
                                 str(tiny_model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "OpenCV" not in result.output


def labels_folder(root: Path, values: tuple[int, ...], size: tuple[int, int] = (40, 56)) -> Path:
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(root / "images" / f"im{index}.png")
        palette_png(root / "labels" / f"im{index}.png", rng.choice(values, size), seed=index)
    return root


@pytest.mark.parametrize("reduce_zero_label, ignore_index, values", [
    (True, 1, (1, 2, 3, 4)),  # mmseg ignores raw 2 (class 1), not raw 1 (class 0)
    (True, 255, (0, 1, 2, 3, 4, 255)),
    (False, 2, (0, 1, 2, 3)),
])
def test_labels_are_reduced_then_ignored_as_mmsegmentation_does(tiny_model, tmp_path, monkeypatch,
                                                               reduce_zero_label, ignore_index, values):
    num_classes = 4
    root = labels_folder(tmp_path / "b", values)
    monkeypatch.setattr("training.evaluate.predict_window", FakeModel(num_classes))
    metrics = benchmark_metrics(root, ["a", "b", "c", "d"], load_model(str(tiny_model)), long_side=None,
                                reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
    expected, pixels = mmseg_pooled_ious(root, num_classes, reduce_zero_label, ignore_index)
    assert metrics["pixels"] == pixels
    got = np.array([np.nan if row["iou"] is None else row["iou"] for row in metrics["classes"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def mmseg_pooled_ious(root: Path, num_classes: int, reduce_zero_label: bool,
                      ignore_index: int) -> tuple[np.ndarray, int]:
    """mmseg's LoadAnnotations (PIL, 'unchanged', reduce_zero_label) and IoUMetric (intersect_and_union per image,
    summed over images, then divided); the fake model's predictions. Also the number of pixels not ignored."""
    inter = union = np.zeros(num_classes)
    pixels = 0
    for label_path in sorted((root / "labels").iterdir()):
        label = np.array(Image.open(label_path)).astype(np.uint8)
        if reduce_zero_label:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        pred = FakeModel.pattern(*label.shape, num_classes)[mask]
        truth = label[mask].astype(np.int64)
        bins = {"bins": num_classes, "range": (0, num_classes - 1)}
        i = np.histogram(pred[pred == truth], **bins)[0]
        inter = inter + i
        union = union + np.histogram(pred, **bins)[0] + np.histogram(truth, **bins)[0] - i
        pixels += int(mask.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union, pixels


def test_raw_zero_is_neither_a_class_nor_ignored_when_the_ignore_index_is_not_255(tiny_model, tmp_path):
    """With --reduce-zero-label mmsegmentation makes 0 into 255, which --ignore-index 1 does not ignore: it
    would count those pixels' predictions, so the tool refuses instead of scoring something else."""
    root = labels_folder(tmp_path / "b", (0, 1, 2, 3, 4))
    result = runner.invoke(app, ["evaluate", "--benchmark", str(root), "-c", "a", "-c", "b", "-c", "c", "-c", "d",
                                 "--model", str(tiny_model), "--device", "cpu", "--reduce-zero-label",
                                 "--ignore-index", "1"])
    assert result.exit_code == 2, result.output
    assert "label value 0 in" in result.output and "it ignores label value 2" in result.output
