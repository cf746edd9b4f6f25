"""Segmentation metrics on labelled pixels, computed with the same engine as `segment`.

`predict_classes` runs `backend.engine.sliding` (the sliding-window engine behind
`farslip segment`), so the mIoU reported here is the mIoU users get. Metrics
follow mmsegmentation: per-class IoU = TP / (TP + FP + FN), NaN for a class
absent from both truth and prediction, mIoU = mean over the others.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from backend.engine.atomic import atomic_output, finite_json, write_text_atomically
from backend.engine.devices import SEGMENT_FLAGS, retry_smaller_batches
from backend.engine.sliding import ArraySource, Segmenter, predict_window
from backend.engine.errors import InputError
from backend.engine.models import LoadedModel
from backend.engine.raster import PixelSource, PixelWindow
from backend.engine.text import TextEmbedder
from backend.engine.presets import parse_class_lines

if TYPE_CHECKING:
    from open_clip.model import CLIP

T = TypeVar("T")


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = truth, columns = prediction; pixels outside 0..C-1 are skipped."""
    keep = (truth >= 0) & (truth < num_classes) & (predicted >= 0) & (predicted < num_classes)
    index = truth[keep].astype(np.int64) * num_classes + predicted[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray, class_names: list[str], unpredicted: int = 0) -> dict:
    """Per-class IoU and accuracy, mIoU, pixel accuracy, as plain values (NaN -> None)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(float)
    truth = confusion.sum(axis=1).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        accuracy = np.where(truth > 0, tp / truth, np.nan)
    total = int(confusion.sum())

    def plain(value: float | np.floating) -> float | None:
        return None if math.isnan(value) else round(float(value), 6)

    return {
        "miou": plain(np.nanmean(iou)) if np.isfinite(iou).any() else None,
        "pixel_accuracy": plain(tp.sum() / total) if total else None,
        "mean_accuracy": plain(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else None,
        "pixels": total,
        "unpredicted_pixels": int(unpredicted),
        "classes": [
            {"class": name, "iou": plain(i), "accuracy": plain(a), "pixels": int(n)}
            for name, i, a, n in zip(class_names, iou, accuracy, truth)
        ],
        "class_names": list(class_names),
        "confusion": confusion.tolist(),
    }


def format_metrics(metrics: dict) -> str:
    """A text report: per-class table, summary line and the confusion matrix."""

    def pct(value):
        return "   -  " if value is None else f"{100 * value:6.2f}"

    names = metrics["class_names"]
    width = max(12, *(len(n) for n in names)) + 2
    lines = [f"{'class':<{width}} {'IoU %':>6} {'acc %':>6} {'pixels':>10}"]
    for row in metrics["classes"]:
        lines.append(f"{row['class']:<{width}} {pct(row['iou'])} {pct(row['accuracy'])} {row['pixels']:>10}")
    lines.append(f"{'mIoU':<{width}} {pct(metrics['miou'])}")
    lines.append(f"pixel accuracy {pct(metrics['pixel_accuracy']).strip()} %, mean class accuracy "
                 f"{pct(metrics['mean_accuracy']).strip()} %, {metrics['pixels']} labelled pixels"
                 + (f", {metrics['unpredicted_pixels']} without prediction" if metrics["unpredicted_pixels"]
                    else ""))
    lines.append("")
    lines.append("confusion matrix (rows: truth, columns: prediction)")
    cell = max(8, *(len(str(v)) + 1 for row in metrics["confusion"] for v in row))
    short = [n[:cell - 1] for n in names]
    lines.append(" " * width + "".join(f"{n:>{cell}}" for n in short))
    for name, row in zip(names, metrics["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def plot_confusion(metrics: dict, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG (matplotlib, Agg), all or nothing."""
    path = Path(path)
    with atomic_output(path) as staged:
        draw_confusion(metrics, staged, title)
    return path


# Fonts for class names in other scripts, used where the system has them (matplotlib's DejaVu has no CJK).
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans Arabic",
                  "Noto Sans Devanagari", "Noto Sans Thai", "WenQuanYi Zen Hei", "Droid Sans Fallback",
                  "Microsoft YaHei", "SimHei", "Malgun Gothic", "Arial Unicode MS")


def draw_confusion(metrics: dict, path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG at `path` (whatever its extension, or none)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    # Where no font has a name's script, it shows as boxes in the picture (the JSON holds the names), without
    # a warning line per missing glyph.
    installed = {font.name for font in font_manager.fontManager.ttflist}
    families = ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]

    confusion = np.asarray(metrics["confusion"], dtype=float)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    names = metrics["class_names"]
    side = max(4.0, 0.6 * len(names) + 2.5)
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        _draw(plt, normalised, names, metrics, title, side, path)


def _draw(plt, normalised, names, metrics, title, side, path) -> None:
    figure, axes = plt.subplots(figsize=(side + 1, side))
    try:
        image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names)
        axes.set_xlabel("prediction")
        axes.set_ylabel("truth")
        if len(names) <= 20:
            for i in range(len(names)):
                for j in range(len(names)):
                    axes.text(j, i, f"{normalised[i, j]:.2f}", ha="center", va="center", fontsize=8,
                              color="white" if normalised[i, j] > 0.5 else "black")
        miou = metrics.get("miou")
        axes.set_title(title or (f"mIoU {100 * miou:.2f} %" if miou is not None else "confusion matrix"))
        figure.colorbar(image, ax=axes, fraction=0.046)
        figure.tight_layout()
        # The format is named: without it matplotlib takes it from the extension, and appends ".png"
        # to a name that has none.
        figure.savefig(path, dpi=100, format="png")
    finally:
        plt.close(figure)


def json_text(data, indent: int | None = 2) -> str:
    """`data` as valid JSON text (finite_json's nulls for NaN), ending in a newline."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False) + "\n"


def write_json(data: dict, path: str | Path) -> Path:
    return write_text_atomically(path, json_text(data))


def segmenter_for(loaded: LoadedModel, class_lines: list[str], model: CLIP | None = None,
                  embedder: TextEmbedder | None = None, attention: str = "segearth",
                  batch_size: int | None = None) -> Segmenter:
    """The engine's Segmenter for `loaded`, optionally with another vision model (one being trained); batches of
    `batch_size` crops (default: as segment picks it, 8 on the CPU and from the free memory on a GPU)."""
    if model is not None:
        loaded = copy.copy(loaded)
        loaded.model = model
    if batch_size is None:
        from backend.engine.segment import default_batch_size

        batch_size = default_batch_size(loaded.device)
    return Segmenter(loaded, parse_class_lines(class_lines), attention=attention, batch_size=batch_size,
                     embedder=embedder)


def predict_classes(segmenter: Segmenter, source: PixelSource, window: PixelWindow,
                    should_cancel: Callable[[], bool] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    notice: Callable[[str], None] | None = None,
                    flags: Collection[str] = SEGMENT_FLAGS) -> np.ndarray:
    """(h, w) class ids (254/255 = unclassified/nodata) of `window`, exactly as `segment` computes them; on a GPU
    that runs out of memory in a batch, again with half the batch (predict_with_retries; `notice`, `flags`)."""
    model = segmenter.loaded.model
    was_training = model.training
    model.eval()
    try:
        return predict_with_retries(segmenter, lambda: predict_window(
            segmenter, source, window, should_cancel=should_cancel, progress=progress), notice, flags).class_ids
    finally:
        model.train(was_training)


def note_on_stderr(sentence: str) -> None:
    print(f"Note: {sentence}", file=sys.stderr)


def predict_with_retries(segmenter: Segmenter, predict: Callable[[], T], notice: Callable[[str], None] | None = None,
                         flags: Collection[str] = SEGMENT_FLAGS) -> T:
    """predict(), and when a batch of the dense pass runs out of GPU memory, again with half the segmenter's batch
    (which the later calls keep), as `segment` does (devices.retry_smaller_batches): `notice` hears one sentence
    per retry (default: a note on stderr); nothing fitting, even one crop, is a DeviceMemoryError whose advice names
    only the options among `flags` (those of the command at hand; default: `farslip evaluate`'s)."""
    def attempt(batch_size: int) -> T:
        segmenter.batch_size = batch_size
        return predict()

    return retry_smaller_batches(attempt, segmenter.batch_size, notice or note_on_stderr, flags)


def score(truth: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> dict:
    """Metrics of predicted class ids against truth (-1 = unlabelled)."""
    num_classes = len(class_names)
    labelled = truth >= 0
    unpredicted = int((labelled & (predicted >= num_classes)).sum())
    return metrics_from_confusion(confusion_matrix(truth, predicted, num_classes), class_names, unpredicted)


# --- benchmark folders ------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PROTOCOLS = ("farslip", "segearth")


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where a benchmark's images and labels lie under its root folder (mmsegmentation's rules)."""

    images: str = "img_dir/{split}"
    labels: str = "ann_dir/{split}"
    split: str = "val"
    image_suffix: str = ".png"
    label_suffix: str = ".png"  # a label is its image's name with image_suffix replaced by this

    def folders(self, root: Path, split: str | None = None) -> tuple[Path, Path]:
        split = split or self.split
        return root / self.images.format(split=split), root / self.labels.format(split=split)


def benchmark_table() -> dict:
    """resources/presets/benchmarks.json: protocols and per-benchmark layout and label coding."""
    from backend.engine.presets import presets_dir

    return json.loads((presets_dir() / "benchmarks.json").read_text(encoding="utf-8"))


def benchmark_entry(preset: str | None) -> dict:
    """The benchmarks.json entry of a preset ({} for presets that are not benchmarks)."""
    return dict(benchmark_table()["benchmarks"].get((preset or "").strip().lower(), {}))


def benchmark_layout(preset: str | None) -> BenchmarkLayout | None:
    entry = benchmark_entry(preset)
    if not entry:
        return None
    fields = set(BenchmarkLayout.__dataclass_fields__)
    return BenchmarkLayout(**{k: v for k, v in entry.items() if k in fields})


def benchmark_protocol(preset: str | None, protocol: str = "farslip") -> dict:
    """Threshold, background index and label coding of a benchmark preset under `protocol`.

    'farslip' (default): probability threshold 0 and background index 0, as every FarSLIP row of
    the paper was computed; 'segearth': the per-dataset values of the RS-OVSS configs.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol must be {' or '.join(PROTOCOLS)}; got {protocol!r}.")
    table = benchmark_table()
    entry = benchmark_entry(preset)
    if protocol == "segearth":
        if "segearth" not in entry:
            known = ", ".join(table["benchmarks"])
            raise InputError(f"--protocol segearth needs one of the benchmark presets ({known}): its "
                             "thresholds are set per dataset. Give --preset, or use --protocol farslip.")
        settings = dict(entry["segearth"])
    else:
        settings = dict(table["protocols"]["farslip"])
    settings["reduce_zero_label"] = bool(entry.get("reduce_zero_label", False))
    return settings


def _files_with_suffix(folder: Path, suffix: str) -> list[Path]:
    """Files under `folder` (recursively) whose name ends with `suffix` (case-insensitive), sorted."""
    suffix = suffix.lower()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffix))


def _layout_pairs(folder: Path, layout: BenchmarkLayout, split: str | None) -> list[tuple[Path, Path]]:
    images_dir, labels_dir = layout.folders(folder, split)
    for what, path in (("image", images_dir), ("label", labels_dir)):
        if not path.is_dir():
            raise InputError(f"The {what} folder {path} does not exist: this benchmark keeps its {what}s in "
                             f"{path.relative_to(folder)} under the dataset folder given with --benchmark "
                             "(check the folder and --benchmark-split).")
    labels = {p.relative_to(labels_dir).as_posix().lower(): p
              for p in _files_with_suffix(labels_dir, layout.label_suffix)}
    pairs, missing = [], []
    for image in _files_with_suffix(images_dir, layout.image_suffix):
        relative = image.relative_to(images_dir).as_posix()
        wanted = relative[:len(relative) - len(layout.image_suffix)] + layout.label_suffix
        label = labels.get(wanted.lower())
        if label is None:
            missing.append(wanted)
        else:
            pairs.append((image, label))
    if missing:
        raise InputError(f"{len(missing)} image(s) in {images_dir} have no label in {labels_dir}, e.g. "
                         f"{missing[0]} is missing. Labels are named like their image with "
                         f"{layout.image_suffix!r} replaced by {layout.label_suffix!r}.")
    if not pairs:
        raise InputError(f"No images ending in {layout.image_suffix!r} were found in {images_dir}.")
    return pairs


def benchmark_pairs(folder: str | Path, layout: BenchmarkLayout | None = None,
                    split: str | None = None) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a benchmark folder.

    With a `layout` (a benchmark preset's), exactly that layout; otherwise mmsegmentation's
    `img_dir/<split>` + `ann_dir/<split>` or `images/` + `labels/` (or `masks/`, `annotations/`),
    labels named like their images.
    """
    folder = Path(folder)
    if not folder.is_dir():  # not "no pairs found in" a folder that is not there
        raise InputError(f"The benchmark folder {folder} {'is a file' if folder.exists() else 'does not exist'}; "
                         "give the folder that holds the dataset's images and labels.")
    if layout is not None:
        return _layout_pairs(folder, layout, split)
    split = split or "val"
    candidates = [(folder / "img_dir" / split, folder / "ann_dir" / split), (folder / "img_dir", folder / "ann_dir")]
    candidates += [(folder / "images", folder / name) for name in ("labels", "masks", "annotations")]
    for images, labels in candidates:
        if images.is_dir() and labels.is_dir():
            # Hidden files (macOS ._x.png beside x.png) are no images; two labels of one stem are ambiguous.
            labelled = sorted(p for p in labels.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                              and not p.name.startswith("."))
            by_stem = {p.stem: p for p in labelled}
            stems = Counter(p.stem for p in labelled)
            twice = sorted(stem for stem, count in stems.items() if count > 1)
            if twice:
                raise InputError(f"{labels} holds two labels named {twice[0]} ("
                                 f"{', '.join(p.name for p in labelled if p.stem == twice[0])}); keep one per image.")
            found = [p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                     and not p.name.startswith(".")]
            pairs = [(p, by_stem[p.stem]) for p in found if p.stem in by_stem]
            missing = [p.name for p in found if p.stem not in by_stem]
            if pairs and missing:  # skipped, they would leave the score of a part of the dataset
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise InputError(f"{len(missing)} image(s) in {images} have no label in {labels}: {shown}. Labels "
                                 "are named like their image (any image suffix); add them or remove those images.")
            if pairs:
                return pairs
    raise InputError(f"No image/label pairs found in {folder}: expected img_dir/{split} + ann_dir/{split} "
                     "(mmsegmentation layout) or images/ + labels/ with labels named like their images.")


@contextmanager
def _opened_image(path: Path):
    """A benchmark image or label opened with rasterio (no georeferencing expected); a file GDAL cannot read is
    one sentence."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                yield ds
    except RasterioError as error:
        raise InputError(f"{path} cannot be read as an image (it is empty, damaged, or in a format GDAL does not "
                         f"read: {str(error).strip()[:120]}).") from error


def _read_image(path: Path, image: bool = False) -> np.ndarray:
    """The bands of a benchmark label (or, without OpenCV, image) as GDAL reads them; an `image` that is not 8-bit
    is a sentence (the datasets ship 8-bit images; a 16-bit one was clipped to white)."""
    from rasterio.enums import ColorInterp

    with _opened_image(path) as ds:
        if image and ds.dtypes[0] != "uint8":
            raise InputError(f"The image {path} is {ds.dtypes[0]}, not 8-bit: the benchmarks' images are "
                             "8-bit, as the protocol reads them. Convert it (e.g. gdal_translate -ot Byte "
                             f"-scale) or leave it out (or install {BENCHMARKS_EXTRA} to read it as OpenCV, "
                             "and so mmsegmentation, reads it).")
        bands = ds.read()
        if image and ds.count == 1 and ds.colorinterp[0] == ColorInterp.palette:
            # A palette image is its colours, as OpenCV (and so mmsegmentation) reads it, not its indices.
            table = np.zeros((256, 3), np.uint8)
            for index, colour in ds.colormap(1).items():
                if 0 <= index < 256:
                    table[index] = colour[:3]
            bands = np.moveaxis(table[bands[0]], -1, 0)
        return bands


BENCHMARKS_EXTRA = "the benchmarks extra (pip install 'farslip-qgis[benchmarks]', i.e. opencv-python-headless)"
NO_OPENCV_NOTICE = ("OpenCV is not installed: images are decoded by GDAL and resized by torch instead of as "
                    "mmcv/mmsegmentation do, so the figures may differ from mmsegmentation's in the last digits; "
                    f"install {BENCHMARKS_EXTRA} for the reference's.")


def opencv():
    """The cv2 module (the `benchmarks` extra), or None where it is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


@contextmanager
def _opencv_silent(cv2):
    """OpenCV's own log lines ("[ERROR:0@0.2] ... readHeader") left out: a file it cannot read is our sentence."""
    try:
        from cv2.utils import logging as api  # OpenCV 5
    except ImportError:
        api = cv2  # OpenCV 4: cv2.getLogLevel / cv2.setLogLevel
    get, put = getattr(api, "getLogLevel", None), getattr(api, "setLogLevel", None)
    if get is None or put is None:
        yield
        return
    previous = get()
    put(0)  # LOG_LEVEL_SILENT
    try:
        yield
    finally:
        put(previous)


def read_benchmark_image(path: Path) -> np.ndarray:
    """(3, H, W) uint8 RGB of a benchmark image, as mmsegmentation reads it: mmcv's LoadImageFromFile decodes the
    file's bytes with cv2.imdecode(IMREAD_COLOR) (a palette expanded, grey to three channels, alpha dropped,
    16-bit scaled to 8-bit, EXIF orientation applied) and the data preprocessor turns BGR into RGB. Without
    OpenCV, GDAL reads it (8-bit only; a palette expanded, grey repeated, a fourth band dropped)."""
    cv2 = opencv()
    if cv2 is None:
        bands = _read_image(path, image=True)
        return np.repeat(bands[:1], 3, axis=0) if bands.shape[0] < 3 else bands[:3]
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as error:
        raise InputError(f"{path} cannot be read: {error.strerror or error}.") from error
    bgr = None
    if data.size:
        with _opencv_silent(cv2):
            try:
                bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
            except cv2.error:
                bgr = None
    if bgr is None:
        raise InputError(f"{path} cannot be read as an image (it is empty, damaged, or in a format OpenCV does not "
                         "read; the protocol reads benchmark images with OpenCV, as mmsegmentation does).")
    return np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1))


def _label_truth(label_path: Path) -> np.ndarray:
    """(H, W) int64 label values of a one-band benchmark label (a colour label is refused)."""
    label = _read_image(label_path)
    if label.shape[0] > 1 and not (label == label[:1]).all():
        raise InputError(f"The label {label_path} has {label.shape[0]} different bands (a colour image?): "
                         "benchmark labels must hold class indices in one band, as mmsegmentation's dataset "
                         "converters write them (e.g. tools/dataset_converters/isaid.py).")
    return label[0].astype(np.int64)


def check_same_size(image_path: Path, image_shape: tuple[int, ...], label_path: Path,
                    label_shape: tuple[int, ...]) -> None:
    """Refuse an image and its label of different sizes (a transposed label too): the logits would be stretched
    onto the label and scored against pixels they do not cover. Shapes are (height, width)."""
    height, width = image_shape
    if (height, width) != tuple(label_shape):
        raise InputError(f"The image {image_path} is {width}x{height} pixels but its label {label_path} is "
                         f"{label_shape[1]}x{label_shape[0]} (width x height): a benchmark label covers its image "
                         "pixel for pixel.")


def reduced_labels(truth: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """Label values as mmsegmentation scores them: with reduce_zero_label (LoadAnnotations) 0 -> 255 and
    v -> v-1, 255 staying 255; the ignore index applies to these reduced values."""
    if not reduce_zero_label:
        return truth
    reduced = truth - 1
    reduced[(truth == 0) | (truth == 255)] = 255
    return reduced


def check_label_values(truth: np.ndarray, label_path: Path, num_classes: int, reduce_zero_label: bool,
                       ignore_index: int) -> None:
    """Refuse label values that are neither a class nor ignored: mmsegmentation still counts their pixels'
    predictions, so skipping them would report a higher mIoU than the reference; a right class list has none."""
    reduced = reduced_labels(truth, reduce_zero_label)
    bad = (reduced != ignore_index) & ((reduced < 0) | (reduced >= num_classes))
    if not bad.any():
        return
    values = np.unique(truth[bad])
    shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    plural = len(values) > 1
    if reduce_zero_label:
        what = (f"{'are not class values' if plural else 'is not a class value'} 1..{num_classes} "
                "(--reduce-zero-label: value v is class v-1, 0 and 255 become 255)")
        ignored = {255: "label values 0 and 255", 254: "no label value"}.get(ignore_index,
                                                                           f"label value {ignore_index + 1}")
        nor = (f"nor ignored (as in mmsegmentation, the ignore index {ignore_index} applies to the reduced values: "
               f"it ignores {ignored})")
    else:
        what = f"{'are not class indices' if plural else 'is not a class index'} 0..{num_classes - 1}"
        nor = f"nor the ignore index {ignore_index}"
    raise InputError(f"label value{'s' if plural else ''} {shown} in {label_path} {what} {nor}: check the class "
                     f"list ({num_classes} classes, in label value order) or --ignore-index.")


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) of mmcv's keep-ratio Resize with scale (long_side, long_side) (mmcv.rescale_size): factor
    min(long_side / long side, long_side / short side), sides int(x * factor + 0.5)."""
    factor = min(long_side / max(height, width), long_side / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resized_to_long_side(rgb: np.ndarray, long_side: int):
    """(3, H, W) 8-bit RGB -> torch float (1, 3, h, w) with max(h, w) = long_side, as mmcv's keep-ratio Resize
    (mmcv.imrescale): cv2.resize INTER_LINEAR on the 8-bit values. Without OpenCV: torch bilinear with
    half-pixel centres, rounded to 8-bit values (a value differs by 1 here and there)."""
    import torch
    import torch.nn.functional as F

    height, width = rgb.shape[1:]
    size = resized_size(height, width, long_side)
    if size == (height, width):
        return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))[None]
    cv2 = opencv()
    if cv2 is not None:
        pixels = np.ascontiguousarray(np.moveaxis(np.asarray(rgb, dtype=np.uint8), 0, -1))
        resized = cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 2:  # one band: cv2 drops the channel axis
            resized = resized[..., None]
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(resized, -1, 0), dtype=np.float32))[None]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False).round_().clamp_(0, 255)


def check_benchmark_options(limit: int | None, long_side: int | None, prob_threshold: float | None,
                            ignore_index: int) -> None:
    """The benchmark's numeric options, refused out of range before a model loads."""
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be 1 or more (the first N images); got {limit}.")
    if long_side is not None and long_side < 0:
        raise InputError(f"--long-side must be a number of pixels, or 0 for the native size; got {long_side}.")
    if prob_threshold is not None and not 0.0 <= prob_threshold <= 1.0:
        raise InputError(f"--prob-threshold is a probability, from 0 to 1; got {prob_threshold}.")
    if not 0 <= ignore_index <= 255:
        raise InputError(f"--ignore-index must be a label value from 0 to 255; got {ignore_index}.")


def benchmark_metrics(folder: str | Path, class_lines: list[str], loaded: LoadedModel,
                      layout: BenchmarkLayout | None = None, split: str | None = None,
                      long_side: int | None = 448, reduce_zero_label: bool = False,
                      ignore_index: int = 255, attention: str = "segearth", batch_size: int | None = None,
                      limit: int | None = None, progress: Callable[[int, int, dict], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None, prob_threshold: float = 0.0,
                      background_index: int = 0) -> dict:
    """mIoU over a benchmark folder, following the reference protocol (FARSLIP_METHOD.md section 4).

    Each image is resized so its long side is `long_side` (None: native) and segmented by the
    engine, crops smaller than the model input resized to it as RS-OVSS does; the blended
    logits are bilinearly resized back to the label's size, then scaled, softmaxed and maxed
    over synonyms; pixels whose best probability is below `prob_threshold` get class
    `background_index`. Crops run in batches of `batch_size` (default: as segment picks it); a batch that runs out
    of GPU memory is run again at half the size (predict_with_retries), said as a warning through `progress`
    (else on stderr, as the missing OpenCV is). Images are read and resized as mmcv does (OpenCV; without it GDAL and
    torch, which may differ in the last digits). `reduce_zero_label` maps 0 -> 255 and v -> v-1,
    then label value `ignore_index` of the reduced labels is skipped, as mmsegmentation does.
    """
    import torch
    import torch.nn.functional as F

    check_benchmark_options(limit, long_side, None, ignore_index)
    pairs = benchmark_pairs(folder, layout, split)[:limit]
    names = [spec.name for spec in parse_class_lines(class_lines)]
    if not 0 <= background_index < len(names):
        raise InputError(f"The background index {background_index} is not a class index (0..{len(names) - 1}).")
    if opencv() is None:
        if progress is not None:
            progress(0, len(pairs), {"phase": "warning", "message": NO_OPENCV_NOTICE})
        else:
            print(f"Warning: {NO_OPENCV_NOTICE}", file=sys.stderr)
    # Every label is checked before the model runs: a refusal never comes after hours of inference.
    for image_path, label_path in pairs:
        truth = _label_truth(label_path)
        # Every pixel of the image read: a damaged one is refused before the model runs, not halfway.
        check_same_size(image_path, read_benchmark_image(image_path).shape[1:], label_path, truth.shape)
        check_label_values(truth, label_path, len(names), reduce_zero_label, ignore_index)
    segmenter = segmenter_for(loaded, class_lines, attention=attention, batch_size=batch_size)
    segmenter.keep_logits = True
    segmenter.resize_small_crops = True

    def retrying(sentence: str) -> None:  # said as the missing OpenCV is, above
        if progress is not None:
            progress(0, len(pairs), {"phase": "warning", "message": sentence})
        else:
            print(f"Warning: {sentence}", file=sys.stderr)
    confusion = np.zeros((len(names), len(names)), np.int64)
    for done, (image_path, label_path) in enumerate(pairs):
        rgb = read_benchmark_image(image_path)
        truth = _label_truth(label_path)
        height, width = truth.shape
        tensor = (resized_to_long_side(rgb, long_side) if long_side
                  else torch.from_numpy(rgb.astype(np.float32))[None])
        source = ArraySource(tensor[0].numpy())
        block = predict_with_retries(segmenter, partial(predict_window, segmenter, source,
                                                        should_cancel=should_cancel), retrying)
        logits = F.interpolate(torch.from_numpy(block.logits)[None], size=(height, width), mode="bilinear",
                               align_corners=False)[0]
        probs = segmenter.class_probabilities(logits.numpy())
        predicted = probs.argmax(axis=0)
        predicted[probs.max(axis=0) < prob_threshold] = background_index
        # As mmsegmentation: reduce_zero_label first, then the ignore index on the reduced values.
        truth = reduced_labels(truth, reduce_zero_label)
        truth[truth == ignore_index] = -1
        confusion += confusion_matrix(truth, predicted, len(names))
        if progress is not None:
            progress(done + 1, len(pairs), {"image": image_path.name})
    metrics = metrics_from_confusion(confusion, names)
    metrics["images"] = len(pairs)
    metrics["batch_size"] = segmenter.batch_size  # the one that ran: a retry on a GPU halves it
    cv2 = opencv()
    # What read the images: the figures are mmsegmentation's to the last digit with OpenCV only.
    metrics["image_reader"] = f"opencv {cv2.__version__}" if cv2 is not None else "gdal (OpenCV not installed)"
    root = Path(folder)
    metrics["image_names"] = [image.relative_to(root).as_posix() for image, _ in pairs]
    if layout is not None:
        metrics["split"] = split or layout.split
    else:  # the split is a folder of the mmsegmentation layout only
        wanted = split or "val"
        metrics["split"] = wanted if pairs and pairs[0][0].parent == root / "img_dir" / wanted else None
    return metrics


def class_boundaries(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Pixels of `labels` with a 4-neighbour of another value, both inside `valid`."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        differs = np.diff(labels, axis=axis) != 0
        both = np.minimum(np.take(valid, range(1, labels.shape[axis]), axis=axis),
                          np.take(valid, range(labels.shape[axis] - 1), axis=axis))
        differs &= both
        lead = [slice(None)] * 2
        lead[axis] = slice(1, None)
        trail = [slice(None)] * 2
        trail[axis] = slice(None, -1)
        edge[tuple(lead)] |= differs
        edge[tuple(trail)] |= differs
    return edge


def boundary_f_score(truth: np.ndarray, predicted: np.ndarray, valid: np.ndarray, num_classes: int,
                     tolerance_px: float = 2.0) -> float | None:
    """Mean over classes of the boundary F-score (Perazzi et al., DAVIS): a predicted boundary pixel is
    right when a true boundary of that class lies within `tolerance_px`, and the reverse for recall.
    Boundaries against nodata are not boundaries. None when no class has a boundary."""
    from scipy import ndimage

    scores = []
    for class_id in range(num_classes):
        true_edge = class_boundaries(truth == class_id, valid)
        pred_edge = class_boundaries(predicted == class_id, valid)
        if not true_edge.any() and not pred_edge.any():
            continue
        if not true_edge.any() or not pred_edge.any():
            scores.append(0.0)
            continue
        near_true = ndimage.distance_transform_edt(~true_edge) <= tolerance_px
        near_pred = ndimage.distance_transform_edt(~pred_edge) <= tolerance_px
        precision, recall = near_true[pred_edge].mean(), near_pred[true_edge].mean()
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores)) if scores else None
