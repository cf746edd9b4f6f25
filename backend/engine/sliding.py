"""The sliding-window engine: crops on a grid anchored to the raster -> blended class probabilities.

Implements FARSLIP_METHOD.md section 4 in a streaming form: crops of one
crop row are read together, batched through the vision tower, their logits
bilinearly upsampled across and summed per crop row; only the crop rows
whose pixel rows are still waiting are held. Rows are blended and emitted
as soon as no further crop can touch them, and wide windows are split into column chunks,
so memory depends on the chunk size, not on the raster size. Crops that
cover only masked pixels are skipped: they cannot touch a valid pixel.

Three threads share the work: one reads and normalises the next strip, the engine's own runs the
crops, blends and takes the softmax over the queries, and a finisher turns those probabilities into
class probabilities, classes, scores and pixel signals while the engine goes on and the caller writes
the block before. Torch and numpy release the GIL inside their operations, so the threads overlap.
The engine's own torch ops run on one thread each (HOST_OP_THREADS) in the engine's thread and the
finisher; only the encoder gets the intra-op threads it had.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .dense import normalized_image
from .devices import (batch_step, copies_async, intra_op_threads, pinned_upload, set_intra_op_threads,
                      start_host_copy)
from .encoders import Encoder, TorchEncoder, crop_size
from .errors import CancelledError, ModelError
from .feature_cache import FeatureCache
from .memory import reused_heap
from .models import LoadedModel
from .quality import signal_planes, top_two
from .raster import PixelSource, PixelWindow
from .text import LOGIT_SCALE, TextEmbedder, query_index
from .presets import ClassSpec

NODATA_CLASS = 255
UNCLASSIFIED = 254
# The engine's work units: windows are cut into column chunks x row bands anchored at the window's
# corner, each computed on its own (its crops batched together, halo crops recomputed), so a unit's
# pixels get the same values whichever process computes it (backend/scale distributes these units).
CHUNK_COLUMNS = 2048
CHUNK_ROWS = 4096
# Where the engine's time goes (seconds, summed over a run). "read" and "finish" run in threads of their
# own, beside the others; "read_wait" and "finish_wait" are the parts of them the engine waited for.
STAGES = ("read", "read_wait", "rows", "encode", "blend", "softmax", "finish", "finish_wait")
# Intra-op threads of the engine's own torch ops (similarity, upsampling, blending, softmax) in the
# engine's and the finisher's thread. Its ops are small, and several threads each run them at once:
# with a team of threads per op, every op waited at its barrier for a team member the other
# threads had pushed off a core (on 2 cores, a null-encoder run took 15-20 % longer).
HOST_OP_THREADS = 1


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
    probs: np.ndarray | None  # (C, h, w) float32 class probabilities (max over synonyms); None unless kept
    class_ids: np.ndarray  # (h, w) uint8: class id, UNCLASSIFIED or NODATA_CLASS
    score: np.ndarray      # (h, w) float32 probability of the chosen class (NaN where invalid)
    valid: np.ndarray      # (h, w) bool
    logits: np.ndarray | None = None  # (Q, h, w) blended cosine logits, when the Segmenter keeps them
    signals: np.ndarray | None = None  # (2, h, w) margin and entropy of probs (quality.signal_planes)


class Segmenter:
    """A loaded model + embedded classes, ready to score crops.

    The encoder (encoders.py) turns crops into patch features; everything after it (text
    similarity, upsampling, blending, softmax) runs on the model's device. With a feature cache
    (feature_cache.py) and a scope, crops seen before skip the encoder.
    """

    def __init__(self, loaded: LoadedModel, classes: list[ClassSpec], attention: str = "segearth",
                 batch_size: int = 8, threshold: float = 0.0, embedder: TextEmbedder | None = None,
                 encoder: Encoder | None = None, half: bool | None = None):
        self.loaded = loaded
        self.classes = classes
        self.attention = attention
        self.batch_size = max(1, int(batch_size))
        self.threshold = float(threshold)
        self.keep_logits = False  # benchmarks resample the blended logits before the softmax
        # Blocks carry their class probabilities; a caller that writes no probability raster turns this off,
        # and the finisher then works in one reused buffer instead of a new (classes x rows x width) array.
        self.keep_probs = True
        # Crops smaller than the model input (only when the image is): geodata pads them to the patch
        # grid and interpolates the positional embedding; benchmark mode resizes them to the input
        # size as RS-OVSS does (see `_model_input` and `upsampling`).
        self.resize_small_crops = False
        self.device = loaded.device
        queries, owner = query_index(classes)
        embedder = embedder or TextEmbedder(loaded)
        self.text = embedder.embed(queries).to(self.device).float()
        self.owner = np.asarray(owner)
        # query_index lists each class's queries together: a class is a slice of the query axis.
        assert (np.diff(self.owner) >= 0).all(), "queries grouped by class"
        bounds = np.searchsorted(self.owner, np.arange(len(classes) + 1))
        self._synonyms = [slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
        visual = loaded.model.visual
        self.patch = visual.conv1.kernel_size[0]
        self.crop = crop_size(visual)
        self.stride = self.crop // 2
        self.encoder = encoder or TorchEncoder(visual, attention, self.device, half)
        # The encoder's intra-op threads: its own choice (NullEncoder), else what this thread has now.
        self.encoder_threads: int = getattr(self.encoder, "threads", None) or torch.get_num_threads()
        # A model converted with `models.to_half` runs fp16 end to end (as RS-OVSS runs its evaluation).
        self.half = visual.conv1.weight.dtype == torch.float16
        self.feature_cache: FeatureCache | None = None
        self.cache_scope: str | None = None
        self.crops_cached = 0
        self.crops_encoded = 0
        self.stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._pin = self.device.type == "cuda"
        # On a GPU each crop row's normalised strip goes to the device once and its crops are cut there
        # (they overlap by half: stacking them on the host copied every pixel twice over, per batch).
        self.strips_on_device = self.device.type == "cuda"
        self._to_cache: deque[tuple[list, torch.Tensor, torch.cuda.Event | None]] = deque()
        self._upsampling: dict[tuple[int, int], torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def num_queries(self) -> int:
        return self.text.shape[0]

    def use_cache(self, cache: FeatureCache | None, scope: str | None) -> None:
        self.feature_cache, self.cache_scope = (cache, scope) if cache is not None and scope else (None, None)

    def upload_strip(self, rgb: np.ndarray) -> torch.Tensor:
        """A CLIP-normalised strip (3, h, w) on the device, its crops to be cut there (`strips_on_device`).

        To a GPU through page-locked memory, without waiting: torch's caching host allocator hands the
        block out again only once its upload is done. Called from the read-ahead thread; the upload is
        queued on the device before the engine's thread queues any work on the strip's crops."""
        if not self._pin:  # the strip is the reader's new array, never written again
            return torch.from_numpy(rgb).to(self.device)
        return pinned_upload(rgb, self.device)

    def _batch(self, crops: Sequence[np.ndarray] | Sequence[torch.Tensor]) -> torch.Tensor:
        """CLIP-normalised crops (3, h, w) -> one batch on the device. Crops cut from strips already on
        the device (upload_strip, a GPU's) are stacked there; host crops are stacked on the host."""
        if isinstance(crops[0], torch.Tensor):
            return torch.stack(list(crops))  # type: ignore[arg-type]
        tensor = torch.from_numpy(np.stack(crops))
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=copies_async(self.device))

    @torch.inference_mode()
    def crop_features(self, crops: Sequence[np.ndarray], keys: list | None = None) -> torch.Tensor:
        """B CLIP-normalised crops (3, h, w) (`normalized_image`) -> (B, gh, gw, D) patch features on the
        device (cached ones reused)."""
        self._store_finished()
        cached: list[np.ndarray | None] = [None] * len(crops)
        cache, scope = self.feature_cache, self.cache_scope
        if cache is not None and scope is not None and keys is not None:
            cached = [cache.get(scope, key, shape=self.feature_shape(crop)) for key, crop in zip(keys, crops)]
        missing = [i for i, found in enumerate(cached) if found is None]
        self.crops_cached += len(crops) - len(missing)
        self.crops_encoded += len(missing)
        started = time.perf_counter()
        computed = None
        if missing:
            subset = crops if len(missing) == len(crops) else [crops[i] for i in missing]
            with intra_op_threads(self.encoder_threads):
                computed = self.encoder(self._model_input(self._batch(subset)))
            if self.feature_cache is not None and keys is not None:
                self._queue_for_cache([keys[i] for i in missing], computed)
        self.stage_s["encode"] += time.perf_counter() - started
        if computed is not None and len(missing) == len(crops):
            return computed
        computed_at = {i: j for j, i in enumerate(missing)}
        parts = []
        for i, found in enumerate(cached):  # assembled on the device: no wait for the encoder here
            if found is None:
                assert computed is not None, "every crop the cache lacks was encoded above"
                parts.append(computed[computed_at[i]])
            else:
                parts.append(torch.from_numpy(found).to(self.device, non_blocking=copies_async(self.device)))
        return torch.stack(parts)

    def feature_shape(self, crop: np.ndarray | torch.Tensor) -> tuple[int | None, ...]:
        """(gh, gw, D) of the patch features of a crop (3, h, w): what a cached entry for it must be."""
        height, width = crop.shape[-2:]
        if self.resizes_crop(height, width):
            rows = cols = self.crop // self.patch
        else:
            rows, cols = -(-height // self.patch), -(-width // self.patch)
        return rows, cols, int(self.text.shape[1])  # the features meet the text embeddings: the same width

    def resizes_crop(self, height: int, width: int) -> bool:
        return self.resize_small_crops and (height < self.crop or width < self.crop)

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised crops -> what the encoder sees: padded to the patch grid (bottom/right), or, for a
        small crop in benchmark mode, padded centred and resized to the input size as RS-OVSS does
        (no positional-embedding interpolation)."""
        height, width = pixels.shape[-2:]
        pad_h, pad_w = (-height) % self.patch, (-width) % self.patch
        if self.resizes_crop(height, width):
            top, left = pad_h // 2, pad_w // 2
            padded = F.pad(pixels, (left, pad_w - left, top, pad_h - top))
            return F.interpolate(padded, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
        return F.pad(pixels, (0, pad_w, 0, pad_h)) if pad_h or pad_w else pixels

    def _queue_for_cache(self, keys: list, features: torch.Tensor) -> None:
        """Copy features to the host without waiting: they are stored at the next batch (or at the end)."""
        if self.device.type == "cuda":
            host, event = start_host_copy(features)
            self._to_cache.append((keys, host, event))
        else:  # the CPU's own tensor; a Mac's GPU (MPS) copies to the host here: its tensors have no numpy view
            self._to_cache.append((keys, features.cpu(), None))
        if self.device.type != "cuda":
            self._store_finished()

    def _store_finished(self, wait: bool = False) -> None:
        """Put the queued features whose copy to the host is done into the cache, in order; with `wait`,
        all of them (the end of a run). A GPU's copies are not waited for between batches: the host stays
        free to queue the next batches while the device still works on earlier ones."""
        if not self._to_cache:
            return
        cache, scope = self.feature_cache, self.cache_scope
        assert cache is not None and scope is not None, "features are queued only while a cache is in use"
        while self._to_cache:
            keys, host, event = self._to_cache[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            for key, features in zip(keys, host.numpy()):
                # Never a crop whose features are not numbers (a damaged export, broken weights): the run fails
                # on them, and kept they failed every later run of the extent, under any --runtime.
                if np.isfinite(features).all():
                    cache.put(scope, key, features.copy())
            self._to_cache.popleft()

    def flush_cache(self) -> None:
        self._store_finished(wait=True)

    @torch.inference_mode()
    def patch_logits(self, crops: Sequence[np.ndarray], keys: list | None = None) -> torch.Tensor:
        """B CLIP-normalised crops (3, h, w) -> (B, Q, gh, gw) patch-text cosine logits on the device."""
        features = self.crop_features(crops, keys)
        started = time.perf_counter()
        batch, grid_h, grid_w, dims = features.shape
        # One (queries x D) @ (D x patches) product per crop, straight into (B, Q, gh, gw): twice as fast
        # on the CPU as einsum's single (patches x D) @ (D x queries) product with its few columns.
        logits = torch.matmul(self.text, features.reshape(batch, grid_h * grid_w, dims).transpose(1, 2))
        logits = logits.view(batch, -1, grid_h, grid_w)
        self.stage_s["blend"] += time.perf_counter() - started
        return logits

    def upsampling(self, pixels: int, resized: bool = False) -> torch.Tensor:
        """(grid, pixels) matrix of the bilinear upsampling from a crop's patches to its `pixels` pixels.

        Bilinear interpolation (align_corners=False) is separable and linear, so the engine applies it
        as two small matrix products: across each crop, then once down each crop row's sum. The
        patch grid covers the crop padded to whole patches (dropped at the end), or, for a small crop
        resized to the input (benchmark mode), the input, resized back to the centred padding.
        """
        padded = math.ceil(pixels / self.patch) * self.patch
        grid, offset = (self.crop // self.patch, (padded - pixels) // 2) if resized else (padded // self.patch, 0)
        key = (pixels, resized)
        if key not in self._upsampling:
            impulses = torch.eye(grid, dtype=torch.float32)[None]
            weights = F.interpolate(impulses, size=padded, mode="linear", align_corners=False)[0]
            self._upsampling[key] = weights[:, offset:offset + pixels].contiguous().to(self.device)
        return self._upsampling[key]

    def class_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(Q, h, w) averaged logits -> (C, h, w): softmax over queries, then max over synonyms."""
        with torch.inference_mode():
            return self._class_probabilities(torch.from_numpy(logits).to(self.device)).cpu().numpy()

    def scratch(self, name: str, shape: torch.Size) -> torch.Tensor:
        """A float32 buffer of `shape` on the device, the same one each time the shape repeats.

        The engine blends each run of finished rows into one (queries, rows, width) buffer and takes
        their softmax into one of two more in turn (the finisher thread still reads the other), 44 MB
        each with 48 queries and 2048 columns; new ones would be faulted into memory page by page
        each time, which took longer than the softmax itself.
        """
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return buffer

    def _class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self._synonym_maxima(torch.softmax(logits * LOGIT_SCALE, dim=0))

    def query_probabilities(self, logits: torch.Tensor, buffer: str) -> torch.Tensor:
        """Blended logits (queries, rows, width) at the logit scale -> their softmax over the queries: into
        the scratch buffer `buffer` when classes have synonyms (their maxima are taken next) or when blocks
        keep no probabilities (`keep_probs` off), else a new array (the class probabilities a Block keeps)."""
        if len(self._synonyms) == logits.shape[0] and self.keep_probs:
            return torch.softmax(logits, dim=0)
        return torch.softmax(logits, dim=0, out=self.scratch(buffer, logits.shape))

    def _synonym_maxima(self, probs: torch.Tensor, buffer: str | None = None) -> torch.Tensor:
        """(Q, h, w) query probabilities -> (C, h, w) class probabilities, the max over each class's synonyms
        (into the scratch buffer `buffer` when given, else a new array)."""
        if len(self._synonyms) == probs.shape[0]:
            return probs
        # Pairwise maxima into one output: a reduction over a few query planes (amax, then stack)
        # costs several times more than the elementwise maximum.
        shape = torch.Size((len(self._synonyms), *probs.shape[1:]))
        out = (self.scratch(buffer, shape) if buffer is not None else
               torch.empty(shape, dtype=probs.dtype, device=probs.device))
        for c, rows in enumerate(self._synonyms):
            out[c] = probs[rows.start]
            for q in range(rows.start + 1, rows.stop):
                torch.maximum(out[c], probs[q], out=out[c])
        return out

    @torch.inference_mode()
    def finish(self, query_probs: torch.Tensor, valid: np.ndarray, row0: int, col0: int,
               logits: np.ndarray | None = None) -> Block:
        """Query probabilities of blended rows (`query_probabilities`) and the rows' validity (and their
        blended logits, which the Block keeps) -> the Block of class probabilities, classes, scores and
        pixel signals."""
        started = time.perf_counter()
        # The finisher is one thread, done with its buffer when a block is returned (that keeps no probabilities).
        class_probs = self._synonym_maxima(query_probs, None if self.keep_probs else "class_probs")
        best, best_ids, runner_up = top_two(class_probs)
        signals = signal_planes(class_probs, best, runner_up).cpu().numpy()
        # A kept one is a new array, never a scratch buffer: blocks are the caller's.
        probs = class_probs.cpu().numpy() if self.keep_probs else None
        class_ids = best_ids.cpu().numpy()
        score = best.cpu().numpy()
        require_finite(score, valid, self.encoder)
        if self.threshold > 0:
            class_ids[score < self.threshold] = UNCLASSIFIED
        if not valid.all():
            class_ids[~valid] = NODATA_CLASS
            score[~valid] = np.nan
            if probs is not None:
                probs[:, ~valid] = np.nan
            signals[:, ~valid] = np.nan
        self.stage_s["finish"] += time.perf_counter() - started
        return Block(row0, col0, probs, class_ids, score, valid, logits, signals)


# What to do when the model's output is not a number, unless its encoder knows better (a compiled runtime's
# cached export may be damaged: runtimes.CompiledEncoder.remedy).
NOT_FINITE_REMEDY = ("Run again with another --runtime; if torch fails the same way, the model's weights are "
                     "unusable: download or train the model again.")


def require_finite(score: np.ndarray, valid: np.ndarray, encoder: Encoder | None = None) -> None:
    """Refuse the run when the chosen class's probability of a valid pixel is not a number: the model's
    output was NaN or infinite there (top_two and the softmax carry NaN on), and no class can be chosen."""
    if np.isfinite(score.sum()):  # the usual case, at the cost of one sum (invalid pixels may be anything)
        return
    broken = int((~np.isfinite(score) & valid).sum())
    if not broken:
        return
    name = f"the image encoder ({encoder.name})" if encoder is not None else "the model"
    raise ModelError(f"The output of {name} is not a number (NaN or infinite) at {broken} valid pixel"
                     f"{'' if broken == 1 else 's'}, so no class can be chosen there; nothing was written. "
                     f"{getattr(encoder, 'remedy', NOT_FINITE_REMEDY)}")


def label_probabilities(probs: np.ndarray, valid: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w) probabilities -> class ids (UNCLASSIFIED below `threshold`, NODATA_CLASS where invalid) and
    the chosen class's probability (NaN where invalid); a valid pixel's NaN refuses the run (require_finite)."""
    known = np.where(valid[None], probs, 0.0)
    score = known.max(axis=0).astype(np.float32)  # NaN where a class is NaN
    require_finite(score, valid)
    class_ids = known.argmax(axis=0).astype(np.uint8)
    if threshold > 0:
        class_ids[score < threshold] = UNCLASSIFIED
    class_ids[~valid] = NODATA_CLASS
    score[~valid] = np.nan
    return class_ids, score


def units(window: PixelWindow, chunk_rows: int | None = None, chunk_columns: int | None = None
          ) -> list[PixelWindow]:
    """The work units of `window`: column chunks (outer) x row bands, anchored at the window's corner."""
    chunk_rows, chunk_columns = chunk_rows or CHUNK_ROWS, chunk_columns or CHUNK_COLUMNS
    return [PixelWindow(r0, c0, min(chunk_rows, window.row_off + window.height - r0),
                        min(chunk_columns, window.col_off + window.width - c0))
            for c0 in range(window.col_off, window.col_off + window.width, chunk_columns)
            for r0 in range(window.row_off, window.row_off + window.height, chunk_rows)]


def count_crops(height: int, width: int, window: PixelWindow, crop: int, stride: int,
                chunk_columns: int | None = None, chunk_rows: int | None = None) -> int:
    """Crops the engine runs for `window` (those overlapping two units are counted in each)."""
    row_starts, col_starts = crop_starts(height, crop, stride), crop_starts(width, crop, stride)
    return sum(len(_overlapping(row_starts, min(crop, height), unit.row_off, unit.row_off + unit.height))
               * len(_overlapping(col_starts, min(crop, width), unit.col_off, unit.col_off + unit.width))
               for unit in units(window, chunk_rows, chunk_columns))


def predict_blocks(segmenter: Segmenter, source: PixelSource, window: PixelWindow,
                   progress: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   chunk_columns: int | None = None, chunk_rows: int | None = None) -> Iterator[Block]:
    """Stream finished blocks of `window` (processing-grid pixels of `source`), unit by unit (see `units`).

    `source` has .height, .width and .read(PixelWindow) -> (rgb (3,h,w) 0..255, valid (h,w)).
    The result for a pixel does not depend on `window`: the crop grid is the source's.
    progress(crops_done, crops_total) is called before the first crop and after every batch.
    """
    crop_h, crop_w = min(segmenter.crop, source.height), min(segmenter.crop, source.width)
    stride = segmenter.stride
    total = count_crops(source.height, source.width, window, segmenter.crop, stride, chunk_columns, chunk_rows)
    done = 0

    def advance(crops: int) -> None:
        nonlocal done
        done += crops
        if progress is not None:
            progress(done, total)

    advance(0)
    row_starts_all = crop_starts(source.height, segmenter.crop, stride)
    col_starts_all = crop_starts(source.width, segmenter.crop, stride)

    def blocks() -> Generator[Block, None, None]:
        for unit in units(window, chunk_rows, chunk_columns):
            row_starts = _overlapping(row_starts_all, crop_h, unit.row_off, unit.row_off + unit.height)
            col_starts = _overlapping(col_starts_all, crop_w, unit.col_off, unit.col_off + unit.width)
            band = PixelWindow(unit.row_off, window.col_off, unit.height, window.width)
            for block in _predict_chunk(segmenter, source, band, row_starts, col_starts, (crop_h, crop_w),
                                        unit.col_off, unit.col_off + unit.width, advance, should_cancel):
                block.row0 += band.row_off - window.row_off
                yield block

    with reused_heap():  # the blocks of every crop row are freed and allocated again
        yield from _steps_with_threads(blocks(), HOST_OP_THREADS)


def _steps_with_threads(steps: Generator[Block, None, None], threads: int) -> Iterator[Block]:
    """`steps`, each advanced with `threads` intra-op threads; the caller's code between two blocks
    runs with its own."""
    try:
        while True:
            with intra_op_threads(threads):
                block = next(steps, None)
            if block is None:
                return
            yield block
    finally:
        with intra_op_threads(threads):
            steps.close()  # an abandoned run stops its threads now, not when it is collected


@dataclass
class _CropRow:
    """One crop row of a chunk: its crops' logits upsampled across and summed, (queries, patch rows,
    width) (None when every crop of it was skipped), how many of its crops cover each column, and the
    validity of its pixels (crop height, width). The counts stay on the host, where the validity is
    built: reading them back from a GPU would wait for its queue at every crop row."""
    top: int
    valid: np.ndarray
    band: torch.Tensor | None = None
    columns: np.ndarray | None = None


def _blended_rows(crop_rows: Sequence[_CropRow], down: torch.Tensor, first: int, stop: int,
                  out: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """The blended logits of absolute rows [first, stop) into `out` (queries, rows, width); their
    validity (valid pixels some crop reached) as the result.

    A row's logits are the sum, over the crop rows covering it, of each one's down-weights for the
    row @ its band, divided by the crops covering each column. The rows are cut where the covering
    crop rows change; each piece is one matrix product per query whose inner dimension runs over the
    patch rows of all its covering crop rows (the division applied to the bands first), written once,
    where the finishing step reads it: no running sums, no second pass to divide.
    """
    height = down.shape[0]
    valid = np.zeros((stop - first, out.shape[-1]), bool)
    cuts = sorted({first, stop} | {edge for row in crop_rows for edge in (row.top, row.top + height)
                                   if first < edge < stop})
    for r0, r1 in zip(cuts, cuts[1:]):
        covering = [row for row in crop_rows if row.top <= r0 and r1 <= row.top + height]
        part = slice(r0 - first, r1 - first)
        if covering:  # every crop row reading these rows read the same pixels
            valid[part] = covering[-1].valid[r0 - covering[-1].top:r1 - covering[-1].top]
        summed = [(row.top, row.band, row.columns) for row in covering
                  if row.band is not None and row.columns is not None]
        if not summed:
            out[:, part].zero_()
            valid[part] = False
            continue
        count = summed[0][2] if len(summed) == 1 else np.sum([columns for _, _, columns in summed], axis=0)
        valid[part] &= count > 0
        weights = torch.cat([down[r0 - top:r1 - top] for top, _, _ in summed], dim=1)
        bands = torch.cat([band for _, band, _ in summed], dim=1) if len(summed) > 1 else summed[0][1]
        # non_blocking: a blocking upload would wait for the device's queue (CUDA stages pageable memory
        # before returning, so the array may go at once).
        divisor = torch.from_numpy(np.maximum(count, 1).astype(np.float32) / np.float32(scale))
        # Small bands: the scale costs nothing here.
        bands = bands / divisor.to(bands.device, non_blocking=copies_async(bands.device))
        if r1 - r0 == len(valid):  # the usual case, one piece: a batched product straight into `out`
            torch.matmul(weights, bands, out=out)
        else:
            for q in range(out.shape[0]):
                torch.mm(weights, bands[q], out=out[q, part])
    return valid


def _strip_reader(source: PixelSource) -> Callable[[PixelWindow], tuple[np.ndarray, np.ndarray]]:
    """read(window) -> (CLIP-normalised RGB, validity), for windows read one after the other.

    Crop rows overlap by half: when the source gives a pixel the same value in any window
    (`same_in_any_window`), the rows a window shares with the one before are copied from it, and only
    the others are read and normalised.
    """
    reuse = bool(getattr(source, "same_in_any_window", False))
    kept: tuple[PixelWindow, np.ndarray, np.ndarray] | None = None  # the strip read last

    def read(window: PixelWindow) -> tuple[np.ndarray, np.ndarray]:
        nonlocal kept
        shared = 0
        if reuse and kept is not None:
            before = kept[0]
            if (before.col_off, before.width) == (window.col_off, window.width) and before.row_off <= window.row_off:
                shared = max(0, min(before.row_off + before.height - window.row_off, window.height))
        if shared and kept is not None:
            before, kept_rgb, kept_valid = kept
            start = window.row_off - before.row_off
            rgb = np.empty((3, window.height, window.width), np.float32)
            valid = np.empty((window.height, window.width), bool)
            rgb[:, :shared], valid[:shared] = kept_rgb[:, start:start + shared], kept_valid[start:start + shared]
            if shared < window.height:
                rest = PixelWindow(window.row_off + shared, window.col_off, window.height - shared, window.width)
                fresh_rgb, valid[shared:] = source.read(rest)
                normalized_image(fresh_rgb, out=rgb[:, shared:])
        else:
            fresh_rgb, valid = source.read(window)
            rgb = normalized_image(fresh_rgb, out=fresh_rgb)  # the source's new array, normalised in place
        kept = (window, rgb, valid)
        return rgb, valid

    return read


def _read_ahead(source: PixelSource, windows: list[PixelWindow], timings: dict[str, float],
                upload: Callable[[np.ndarray], torch.Tensor] | None = None) -> Iterator[tuple]:
    """Yield (CLIP-normalised RGB, validity) of each window, reading and normalising the next one in a
    thread while the caller works; with `upload`, the RGB is what it makes of it (a strip on the GPU).

    GDAL and numpy release the GIL while they decompress and compute, so this overlaps the model and
    the blending.
    """
    read = _strip_reader(source)

    def timed_read(window):
        started = time.perf_counter()
        rgb, valid = read(window)
        strip = (upload(rgb) if upload is not None else rgb), valid
        return strip, time.perf_counter() - started

    if not windows:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="farslip-read") as pool:
        upcoming = pool.submit(timed_read, windows[0])
        for i in range(len(windows)):
            waited = time.perf_counter()
            result, seconds = upcoming.result()
            timings["read_wait"] += time.perf_counter() - waited
            timings["read"] += seconds
            if i + 1 < len(windows):
                upcoming = pool.submit(timed_read, windows[i + 1])
            yield result


def _predict_chunk(segmenter: Segmenter, source: PixelSource, window: PixelWindow, row_starts, col_starts, crop_shape,
                   c0, c1, progress, should_cancel) -> Iterator[Block]:
    crop_h, crop_w = crop_shape
    r_lo, r_hi = window.row_off, window.row_off + window.height
    read_c0, read_c1 = col_starts[0], col_starts[-1] + crop_w
    width = c1 - c0
    queries = segmenter.num_queries
    device = segmenter.device
    timings = segmenter.stage_s

    pending: list[tuple[_CropRow, int, Any]] = []  # (its crop row, crop col start, pixels: numpy or on the device)
    queued_by_row: list[int] = []                     # crops queued once crop row k was read
    ran = 0
    flushed_rows = 0                                  # crop rows whose rows were emitted
    emitted = row_starts[0]                           # absolute row from which nothing was emitted
    crop_rows: list[_CropRow] = []  # the crop rows read whose pixel rows are not all emitted, in order
    resized = segmenter.resizes_crop(crop_h, crop_w)
    across = segmenter.upsampling(crop_w, resized)
    down = segmenter.upsampling(crop_h, resized).T.contiguous()  # (crop_h, patch rows)

    # A resampled raster's pixels depend on where the strip read around them starts and ends (GDAL's
    # resampling of a window), and the strips of a chunk span its crops: a crop's cached features serve
    # only runs that read it in the same strip, so a cached run writes what an uncached one writes.
    strip = () if getattr(source, "same_in_any_window", False) else (read_c0, read_c1)

    def run(batch):
        nonlocal ran
        if should_cancel is not None and should_cancel():
            raise CancelledError("The run was cancelled; nothing was written.")
        keys = [(row.top, xs, crop_h, crop_w, *strip) for row, xs, _ in batch]
        with batch_step(segmenter.batch_size):  # these two steps' memory grows with the batch
            logits = segmenter.patch_logits([p for _, _, p in batch], keys)
            started = time.perf_counter()
            logits = logits @ across                            # (B, Q, gh, crop_w)
        for (row, xs, _), crop_logits in zip(batch, logits):
            assert row.band is not None, "a crop row with crops to run has a band"
            a0, a1 = max(xs, c0), min(xs + crop_w, c1)
            row.band[:, :, a0 - c0:a1 - c0] += crop_logits[:, :, a0 - xs:a1 - xs]
        timings["blend"] += time.perf_counter() - started
        ran += len(batch)
        progress(len(batch))

    finishing: deque[Future] = deque()  # blocks being finished in the finisher thread, in order
    flushes = 0

    def flush(upto: int):
        """Emit the rows above absolute row `upto` (clipped to the window); forget the crop rows above it."""
        nonlocal emitted, flushes
        if upto <= emitted:
            return
        e0, e1 = max(emitted, r_lo), min(upto, r_hi)
        if e1 > e0:
            started = time.perf_counter()
            logits = segmenter.scratch("logits", torch.Size((queries, e1 - e0, width)))
            # The logit scale comes with the blending, unless the blended logits themselves are kept.
            valid = _blended_rows(crop_rows, down, e0, e1, logits, 1.0 if segmenter.keep_logits else LOGIT_SCALE)
            kept = None
            if segmenter.keep_logits:
                kept = logits.to("cpu", copy=True).numpy()
                logits.mul_(LOGIT_SCALE)
            timings["blend"] += time.perf_counter() - started
            started = time.perf_counter()
            # Softmax here, not in the finisher, which had the larger share of the work. Two buffers in
            # turn: the finisher still reads the previous one while this one is filled.
            probs = segmenter.query_probabilities(logits, f"probs{flushes % 2}")
            flushes += 1
            timings["softmax"] += time.perf_counter() - started
            finishing.append(finisher.submit(segmenter.finish, probs, valid, e0 - r_lo, c0 - window.col_off, kept))
        emitted = upto
        while crop_rows and crop_rows[0].top + crop_h <= upto:
            crop_rows.pop(0)

    def finished(keep: int) -> Iterator[Block]:
        """The finished blocks, in order, until at most `keep` are still being finished."""
        while len(finishing) > keep:
            waited = time.perf_counter()
            block = finishing.popleft().result()
            timings["finish_wait"] += time.perf_counter() - waited
            yield block

    reads = [PixelWindow(ys, read_c0, crop_h, read_c1 - read_c0) for ys in row_starts]
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farslip-finish",
                                  initializer=set_intra_op_threads, initargs=(HOST_OP_THREADS,))
    try:
        upload = segmenter.upload_strip if segmenter.strips_on_device else None
        for k, (ys, (rgb, valid)) in enumerate(zip(row_starts, _read_ahead(source, reads, timings, upload))):
            started = time.perf_counter()
            row = _CropRow(ys, valid[:, c0 - read_c0:c1 - read_c0])
            # A crop runs when any of its pixels is valid: one pass over the strip, then its columns.
            valid_columns = valid.any(axis=0)
            running = [xs for xs in col_starts if valid_columns[xs - read_c0:xs - read_c0 + crop_w].any()]
            pending.extend((row, xs, rgb[:, :, xs - read_c0:xs - read_c0 + crop_w]) for xs in running)
            if len(running) < len(col_starts):
                progress(len(col_starts) - len(running))
            if running:
                row.band = torch.zeros((queries, down.shape[1], width), dtype=torch.float32, device=device)
                columns = np.zeros(width, np.float32)  # how many of the row's crops cover each column
                for xs in running:
                    columns[max(xs, c0) - c0:min(xs + crop_w, c1) - c0] += 1
                row.columns = columns
            crop_rows.append(row)
            queued_by_row.append(ran + len(pending))
            timings["rows"] += time.perf_counter() - started
            while len(pending) >= segmenter.batch_size:
                run(pending[:segmenter.batch_size])
                del pending[:segmenter.batch_size]
            # Crop row f is final once its crops ran: rows above the next crop row get no more logits.
            while flushed_rows < k and queued_by_row[flushed_rows] <= ran:
                yield from finished(keep=1)  # its buffer is the one the next flush fills
                flush(row_starts[flushed_rows + 1])
                flushed_rows += 1
        if pending:
            run(pending)
        segmenter.flush_cache()
        yield from finished(keep=1)
        flush(row_starts[-1] + crop_h)
        yield from finished(keep=0)
    finally:
        finisher.shutdown(cancel_futures=True)


def predict_window(segmenter: Segmenter, source: PixelSource, window: PixelWindow | None = None,
                   **kwargs) -> Block:
    """The whole window as one Block (for in-memory images, tests and evaluation)."""
    window = window or PixelWindow(0, 0, source.height, source.width)
    classes = len(segmenter.classes)
    probs = np.full((classes, window.height, window.width), np.nan, np.float32) if segmenter.keep_probs else None
    class_ids = np.full((window.height, window.width), NODATA_CLASS, np.uint8)
    score = np.full((window.height, window.width), np.nan, np.float32)
    valid = np.zeros((window.height, window.width), bool)
    logits = (np.zeros((segmenter.num_queries, window.height, window.width), np.float32)
              if segmenter.keep_logits else None)
    for block in predict_blocks(segmenter, source, window, **kwargs):
        h, w = block.class_ids.shape
        rows, cols = slice(block.row0, block.row0 + h), slice(block.col0, block.col0 + w)
        if probs is not None:
            probs[:, rows, cols] = block.probs
        class_ids[rows, cols] = block.class_ids
        score[rows, cols] = block.score
        valid[rows, cols] = block.valid
        if logits is not None:
            logits[:, rows, cols] = block.logits
    return Block(0, 0, probs, class_ids, score, valid, logits)


class ArraySource:
    """An in-memory RGB image (3, H, W) in 0..255 with an optional validity mask."""

    same_in_any_window = True

    def __init__(self, rgb: np.ndarray, valid: np.ndarray | None = None):
        self.rgb = np.ascontiguousarray(rgb, dtype=np.float32)
        self.height, self.width = self.rgb.shape[1:]
        self.valid = np.ones((self.height, self.width), bool) if valid is None else valid.astype(bool)

    def read(self, window: PixelWindow) -> tuple[np.ndarray, np.ndarray]:
        rgb = self.rgb[:, window.rows, window.cols].copy()
        valid = self.valid[window.rows, window.cols]
        rgb[:, ~valid] = 0.0
        return rgb, valid
