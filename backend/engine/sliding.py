"""The sliding-window engine: crops on a grid anchored to the raster -> blended class probabilities.

Implements FARSLIP_METHOD.md section 4 in a streaming form: crops of one
crop row are read together, batched through the vision tower, their logits
bilinearly upsampled and summed into an accumulator that only holds the
rows still waiting for a later crop row. Rows are emitted as soon as no
further crop can touch them, and wide windows are split into column chunks,
so memory depends on the chunk size, not on the raster size. Crops that
cover only masked pixels are skipped: they cannot touch a valid pixel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dense import dense_patch_features, normalize_pixels
from .errors import CancelledError
from .raster import PixelWindow
from .text import LOGIT_SCALE, ClassSpec, TextEmbedder, query_index

NODATA_CLASS = 255
UNCLASSIFIED = 254
CHUNK_COLUMNS = 2048


def crop_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the crops along one axis; the last crop is shifted back to end at the edge."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def _overlapping(starts: list[int], extent: int, lo: int, hi: int) -> list[int]:
    return [s for s in starts if s < hi and s + extent > lo]


@dataclass
class Block:
    """Finished rows of a window: row0/col0 are offsets inside the requested window."""

    row0: int
    col0: int
    probs: np.ndarray      # (C, h, w) float32 class probabilities (max over synonyms)
    class_ids: np.ndarray  # (h, w) uint8: class id, UNCLASSIFIED or NODATA_CLASS
    score: np.ndarray      # (h, w) float32 probability of the chosen class (NaN where invalid)
    valid: np.ndarray      # (h, w) bool
    logits: np.ndarray | None = None  # (Q, h, w) blended cosine logits, when the Segmenter keeps them


class Segmenter:
    """A loaded model + embedded classes, ready to score crops."""

    def __init__(self, loaded, classes: list[ClassSpec], attention: str = "segearth",
                 batch_size: int = 8, threshold: float = 0.0, embedder: TextEmbedder | None = None):
        self.loaded = loaded
        self.classes = classes
        self.attention = attention
        self.batch_size = max(1, int(batch_size))
        self.threshold = float(threshold)
        self.keep_logits = False  # benchmarks resample the blended logits before the softmax
        # Crops smaller than the model input (only when the image is): geodata pads them to the patch
        # grid and interpolates the positional embedding; benchmark mode resizes them to the input
        # size as RS-OVSS does (see `_small_crop_logits`).
        self.resize_small_crops = False
        queries, owner = query_index(classes)
        embedder = embedder or TextEmbedder(loaded)
        self.text = embedder.embed(queries).to(loaded.device)
        self.owner = np.asarray(owner)
        visual = loaded.model.visual
        self.patch = visual.conv1.kernel_size[0]
        size = visual.image_size
        self.crop = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.stride = self.crop // 2
        self.device = loaded.device
        # A model converted with `models.to_half` runs fp16 end to end (as RS-OVSS runs its
        # evaluation); otherwise CUDA uses fp16 autocast and the CPU fp32.
        self.half = visual.conv1.weight.dtype == torch.float16

    @property
    def num_queries(self) -> int:
        return self.text.shape[0]

    @torch.inference_mode()
    def crop_logits(self, crops: np.ndarray) -> np.ndarray:
        """(B, 3, h, w) RGB 0..255 -> (B, Q, h, w) patch-text cosine logits upsampled to pixels."""
        height, width = crops.shape[-2:]
        pixels = normalize_pixels(torch.from_numpy(crops).to(self.device))
        if self.resize_small_crops and (height < self.crop or width < self.crop):
            return self._small_crop_logits(pixels).cpu().numpy()
        pad_h = math.ceil(height / self.patch) * self.patch - height
        pad_w = math.ceil(width / self.patch) * self.patch - width
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h))
        logits = self._patch_logits(pixels)
        logits = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return logits[:, :, :height, :width].cpu().numpy()

    def _patch_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, Q, H/p, W/p) fp32 patch-text cosine logits."""
        use_amp = self.device.type == "cuda" and not self.half
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            features = dense_patch_features(self.loaded.model.visual, pixels, self.attention)
        return torch.einsum("bhwd,qd->bqhw", features.float(), self.text.float())

    def _small_crop_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """RS-OVSS's handling of a crop smaller than the input: pad it centred (with the normalised
        mean) to a multiple of the patch size, resize it to the input size, and resize the logits
        back to the padded crop before dropping the padding. No positional-embedding interpolation."""
        height, width = pixels.shape[-2:]
        pad_h, pad_w = (-height) % self.patch, (-width) % self.patch
        top, left = pad_h // 2, pad_w // 2
        padded = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
        resized = F.interpolate(padded, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
        logits = F.interpolate(self._patch_logits(resized), size=padded.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits[:, :, top:top + height, left:left + width]

    def class_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(Q, h, w) averaged logits -> (C, h, w): softmax over queries, then max over synonyms."""
        probs = torch.softmax(torch.from_numpy(logits) * LOGIT_SCALE, dim=0).numpy()
        return np.stack([probs[self.owner == c].max(axis=0) for c in range(len(self.classes))])

    def finish(self, logit_sum: np.ndarray, count: np.ndarray, valid: np.ndarray, row0: int,
               col0: int) -> Block:
        logits = logit_sum / np.maximum(count, 1)[None]
        probs = self.class_probabilities(logits)
        valid = valid & (count > 0)
        class_ids, score = label_probabilities(probs, valid, self.threshold)
        probs[:, ~valid] = np.nan
        return Block(row0, col0, probs.astype(np.float32), class_ids, score, valid,
                     logits if self.keep_logits else None)


def label_probabilities(probs: np.ndarray, valid: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) probabilities -> class ids (UNCLASSIFIED below `threshold`, NODATA_CLASS where invalid) and
    the chosen class's probability (NaN where invalid)."""
    class_ids = np.nan_to_num(probs, nan=0.0).argmax(axis=0).astype(np.uint8)
    score = np.nanmax(np.where(valid[None], probs, 0.0), axis=0).astype(np.float32)
    if threshold > 0:
        class_ids[score < threshold] = UNCLASSIFIED
    class_ids[~valid] = NODATA_CLASS
    score[~valid] = np.nan
    return class_ids, score


def count_crops(height: int, width: int, window: PixelWindow, crop: int, stride: int,
                chunk_columns: int = CHUNK_COLUMNS) -> int:
    rows = _overlapping(crop_starts(height, crop, stride), min(crop, height), window.row_off,
                        window.row_off + window.height)
    col_starts = crop_starts(width, crop, stride)
    total = 0
    for c0 in range(window.col_off, window.col_off + window.width, chunk_columns):
        c1 = min(c0 + chunk_columns, window.col_off + window.width)
        total += len(_overlapping(col_starts, min(crop, width), c0, c1))
    return total * len(rows)


def predict_blocks(segmenter: Segmenter, source, window: PixelWindow,
                   progress: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   chunk_columns: int = CHUNK_COLUMNS) -> Iterator[Block]:
    """Stream finished blocks of `window` (processing-grid pixels of `source`).

    `source` has .height, .width and .read(PixelWindow) -> (rgb (3,h,w) 0..255, valid (h,w)).
    The result for a pixel does not depend on `window`: the crop grid is the source's.
    progress(crops_done, crops_total) is called before the first crop and after every batch.
    """
    crop_h, crop_w = min(segmenter.crop, source.height), min(segmenter.crop, source.width)
    stride = segmenter.stride
    total = count_crops(source.height, source.width, window, segmenter.crop, stride, chunk_columns)
    done = 0

    def advance(crops: int) -> None:
        nonlocal done
        done += crops
        if progress is not None:
            progress(done, total)

    advance(0)
    row_starts = _overlapping(crop_starts(source.height, segmenter.crop, stride), crop_h,
                              window.row_off, window.row_off + window.height)
    col_starts_all = crop_starts(source.width, segmenter.crop, stride)
    for c0 in range(window.col_off, window.col_off + window.width, chunk_columns):
        c1 = min(c0 + chunk_columns, window.col_off + window.width)
        col_starts = _overlapping(col_starts_all, crop_w, c0, c1)
        yield from _predict_chunk(segmenter, source, window, row_starts, col_starts, (crop_h, crop_w),
                                  c0, c1, advance, should_cancel)


def _predict_chunk(segmenter, source, window, row_starts, col_starts, crop_shape, c0, c1,
                   progress, should_cancel) -> Iterator[Block]:
    crop_h, crop_w = crop_shape
    r_lo, r_hi = window.row_off, window.row_off + window.height
    read_c0, read_c1 = col_starts[0], col_starts[-1] + crop_w
    width = c1 - c0
    queries = segmenter.num_queries

    # Accumulator rows [acc_top, acc_top + acc_sum.shape[1]) of the chunk's columns.
    acc_top = row_starts[0]
    acc_sum = np.zeros((queries, 0, width), np.float32)
    acc_cnt = np.zeros((0, width), np.float32)
    acc_valid = np.zeros((0, width), bool)
    pending: list[tuple[int, int, np.ndarray]] = []   # (crop row start, crop col start, pixels)
    queued_by_row: list[int] = []                     # crops queued once crop row k was read
    ran = 0
    flushed_rows = 0                                  # crop rows whose rows were emitted

    def run(batch):
        nonlocal ran
        if should_cancel is not None and should_cancel():
            raise CancelledError("The run was cancelled; nothing was written.")
        logits = segmenter.crop_logits(np.stack([p for _, _, p in batch]))
        for (ys, xs, _), crop_logits in zip(batch, logits):
            a0, a1 = max(xs, c0), min(xs + crop_w, c1)
            rows = slice(ys - acc_top, ys - acc_top + crop_h)
            acc_sum[:, rows, a0 - c0:a1 - c0] += crop_logits[:, :, a0 - xs:a1 - xs]
            acc_cnt[rows, a0 - c0:a1 - c0] += 1
        ran += len(batch)
        progress(len(batch))

    def flush(upto: int):
        """Emit accumulator rows above absolute row `upto` (clipped to the window)."""
        nonlocal acc_top, acc_sum, acc_cnt, acc_valid
        n = upto - acc_top
        if n <= 0:
            return None
        e0, e1 = max(acc_top, r_lo), min(upto, r_hi)
        block = None
        if e1 > e0:
            rows = slice(e0 - acc_top, e1 - acc_top)
            block = segmenter.finish(acc_sum[:, rows], acc_cnt[rows], acc_valid[rows],
                                     e0 - r_lo, c0 - window.col_off)
        acc_sum, acc_cnt, acc_valid = acc_sum[:, n:], acc_cnt[n:], acc_valid[n:]
        acc_top = upto
        return block

    for k, ys in enumerate(row_starts):
        rgb, valid = source.read(PixelWindow(ys, read_c0, crop_h, read_c1 - read_c0))
        grow = ys + crop_h - (acc_top + acc_cnt.shape[0])
        if grow > 0:
            acc_sum = np.concatenate([acc_sum, np.zeros((queries, grow, width), np.float32)], axis=1)
            acc_cnt = np.concatenate([acc_cnt, np.zeros((grow, width), np.float32)])
            acc_valid = np.concatenate([acc_valid, np.zeros((grow, width), bool)])
        acc_valid[ys - acc_top:ys - acc_top + crop_h] = valid[:, c0 - read_c0:c1 - read_c0]
        skipped = 0
        for xs in col_starts:
            part = slice(xs - read_c0, xs - read_c0 + crop_w)
            if valid[:, part].any():
                pending.append((ys, xs, rgb[:, :, part]))
            else:
                skipped += 1
        if skipped:
            progress(skipped)
        queued_by_row.append(ran + len(pending))
        while len(pending) >= segmenter.batch_size:
            run(pending[:segmenter.batch_size])
            del pending[:segmenter.batch_size]
        # Crop row f is final once its crops ran: rows above the next crop row get no more logits.
        while flushed_rows < k and queued_by_row[flushed_rows] <= ran:
            block = flush(row_starts[flushed_rows + 1])
            flushed_rows += 1
            if block is not None:
                yield block
    if pending:
        run(pending)
    block = flush(acc_top + acc_cnt.shape[0])
    if block is not None:
        yield block


def predict_window(segmenter: Segmenter, source, window: PixelWindow | None = None,
                   **kwargs) -> Block:
    """The whole window as one Block (for in-memory images, tests and evaluation)."""
    window = window or PixelWindow(0, 0, source.height, source.width)
    classes = len(segmenter.classes)
    probs = np.full((classes, window.height, window.width), np.nan, np.float32)
    class_ids = np.full((window.height, window.width), NODATA_CLASS, np.uint8)
    score = np.full((window.height, window.width), np.nan, np.float32)
    valid = np.zeros((window.height, window.width), bool)
    logits = (np.zeros((segmenter.num_queries, window.height, window.width), np.float32)
              if segmenter.keep_logits else None)
    for block in predict_blocks(segmenter, source, window, **kwargs):
        h, w = block.class_ids.shape
        rows, cols = slice(block.row0, block.row0 + h), slice(block.col0, block.col0 + w)
        probs[:, rows, cols] = block.probs
        class_ids[rows, cols] = block.class_ids
        score[rows, cols] = block.score
        valid[rows, cols] = block.valid
        if logits is not None:
            logits[:, rows, cols] = block.logits
    return Block(0, 0, probs, class_ids, score, valid, logits)


class ArraySource:
    """An in-memory RGB image (3, H, W) in 0..255 with an optional validity mask."""

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None):
        self.rgb = np.ascontiguousarray(rgb, dtype=np.float32)
        self.height, self.width = self.rgb.shape[1:]
        self.valid = np.ones((self.height, self.width), bool) if valid is None else valid.astype(bool)

    def read(self, window: PixelWindow) -> tuple[np.ndarray, np.ndarray]:
        rgb = self.rgb[:, window.rows, window.cols].copy()
        valid = self.valid[window.rows, window.cols]
        rgb[:, ~valid] = 0.0
        return rgb, valid
