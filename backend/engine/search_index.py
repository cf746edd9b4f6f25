"""The search index of a raster: CLIP embeddings of windows on a raster-anchored, multi-scale grid.

Each level of the grid is the raster resampled by 1/factor (factor 1, 2, 4: windows of 224, 448
and 896 native pixels), cut into 224-px windows with stride 112 on that level's own pixel grid,
with the last row/column shifted back to end at the raster's edge (sliding.crop_starts). The grid
depends only on the raster, so a window's embedding never depends on the extent asked for, and
an index built for one extent is completed, not rebuilt, for another.

Per window the index keeps PERSPECTIVES embeddings: the image embedding (CLIP's CLS path, exactly
encode_image) and five sub-perspectives, the four quadrants and the centre, each the mean of the
window's dense patch tokens over that sub-region (the training-free dense path of segment,
normalised). The dense tokens come from the same forward pass (blocks 1..L-1 are shared, one extra
block runs), so the sub-perspectives cost ~1/L of a window instead of the 5 extra forwards that
CLS embeddings of sub-crops would; the finer levels of the grid already hold real CLS embeddings
of windows a quarter the size of the coarser ones.

Storage: one folder per (raster path, model identity: weights sha256, activation, architecture,
precision; the windows' precision, fp16 autocast on a GPU; reading options) in the cache folder, with a
manifest naming the raster's identity (every file GDAL reads for it, feature_cache.raster_identity); one .npz
per grid row (float16 embeddings + a state byte per window), written atomically. Memory while building is one
strip of windows, whatever the raster size. A raster whose files changed since the index was built gets a
fresh index.

On a GPU the windows run as segment's dense pass does: fp16 autocast (encoders.autocast_enabled), a batch sized
from the GPU's free memory unless one is given, crops uploaded through page-locked memory, each chunk's embeddings
copied back while the next chunk runs, and a batch that runs out of memory retried at half the size
(devices.retry_smaller_batches). On the CPU everything runs in fp32, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
import torch
import torch.nn.functional as F

from .atomic import atomic_output, write_text_atomically
from .dense import image_and_patch_features, normalize_pixels
from .devices import batch_step, pinned_upload, retry_smaller_batches, start_host_copy
from .encoders import autocast_enabled
from .errors import CancelledError, InputError, nothing_valid
from .feature_cache import identity_digest, model_identity, raster_identity
from .files import absolute_raster_name, is_gdal_name, raster_label
from .models import LoadedModel
from .options import check_batch_size
from .paths import cache_dir
from .finetuned import bands_for
from .ground import crs_label
from .raster import (PixelWindow, RasterSource, band_choice_warning, bbox_parts_in_raster_crs, coordinates, corner_text,
                     is_rotated, native_gsd_m, open_source, outside_bbox_sentence, parse_crs, pixel_envelope,
                     raster_corners, raster_footprint, request_window, request_windows)
from .sliding import crop_starts

# 2: keyed by the model's variant; staleness by every file GDAL reads. Rows record the raster version they were
# embedded from (rows without it, of an earlier version, are embedded again).
INDEX_FORMAT = "farslip-search-index/2"
LEVEL_FACTORS = (1, 2, 4)
INDEX_TASK = "index or search"  # what an all-nodata raster leaves nothing to (raster.open_source's sentence)
PERSPECTIVES = ("image", "top-left", "top-right", "bottom-left", "bottom-right", "centre")
STATE_MISSING, STATE_EMBEDDED, STATE_EMPTY = 0, 1, 2
CHUNK_WINDOWS = 16  # windows read side by side in one strip: bounds memory for very wide rasters
GDAL_CACHE_BYTES = 64 * 2**20


def index_root() -> Path:
    return cache_dir() / "search-index"


def sub_regions(grid: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) patch ranges of the sub-perspectives on a grid x grid patch map."""
    half, quarter = grid // 2, round(grid / 4)
    return [(0, half, 0, half), (0, half, half, grid), (half, grid, 0, half), (half, grid, half, grid),
            (quarter, grid - quarter, quarter, grid - quarter)]


def window_precision(loaded: LoadedModel, half: bool | None = None) -> str:
    """The precision windows are embedded in: fp16 for a model converted with `models.to_half`, fp16 autocast on
    CUDA unless `half` is False (encoders.autocast_enabled, as the dense pass), else fp32 (always on the CPU)."""
    if loaded.model.visual.conv1.weight.dtype == torch.float16:
        return "fp16"
    return "fp16" if autocast_enabled(loaded.device, half) else "fp32"


def upload(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, 3, h, w) crops as float32 on `device`; to a GPU through page-locked memory, without waiting (torch's
    caching host allocator hands the block out again only once its copy is done)."""
    if device.type != "cuda":
        return torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32)).to(device)
    return pinned_upload(crops, device)


@torch.inference_mode()
def window_embeddings(loaded: LoadedModel, crops: np.ndarray, attention: str = "segearth",
                      half: bool | None = None) -> torch.Tensor:
    """(B, 3, h, w) RGB 0..255 -> (B, PERSPECTIVES, D) L2-normalised float32 embeddings, on the model's device
    (nothing waits for it there); in window_precision's precision."""
    visual = loaded.model.visual
    weights = visual.conv1.weight.dtype
    autocast = window_precision(loaded, half) == "fp16" and weights == torch.float32
    size = visual.image_size
    side = int(size[0] if isinstance(size, (tuple, list)) else size)
    pixels = upload(crops, loaded.device)
    if pixels.shape[-2:] != (side, side):  # windows of a raster smaller than one window
        pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False)
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):  # a --half model: fp16 end to end
        image, dense = image_and_patch_features(visual, normalize_pixels(pixels), attention)
    image, dense = image.float(), dense.float()
    subs = [F.normalize(dense[:, r0:r1, c0:c1].mean(dim=(1, 2)), dim=-1)
            for r0, r1, c0, c1 in sub_regions(dense.shape[1])]
    return torch.stack([image, *subs], dim=1)


def embed_windows(loaded: LoadedModel, crops: np.ndarray, attention: str = "segearth",
                  half: bool | None = None) -> np.ndarray:
    """(B, 3, h, w) RGB 0..255 -> (B, PERSPECTIVES, D) L2-normalised float32 embeddings (window_embeddings), on the
    host."""
    return window_embeddings(loaded, crops, attention, half).cpu().numpy()


def host_copy(vectors: torch.Tensor) -> Callable[[], np.ndarray]:
    """`vectors` on the host, when called: from a GPU copied into page-locked memory without waiting, the wait
    left to the call (the work queued after it runs meanwhile)."""
    if vectors.device.type != "cuda":
        array = vectors.numpy()
        return lambda: array
    host, copied = start_host_copy(vectors)

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return wait


@dataclass
class Level:
    """One scale of the grid: the raster resampled by 1/factor, and its window starts."""

    factor: int
    source: RasterSource
    crop: int
    row_starts: list[int] = field(init=False)
    col_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.row_starts = crop_starts(self.source.height, self.crop, self.crop // 2)
        self.col_starts = crop_starts(self.source.width, self.crop, self.crop // 2)

    @property
    def window_shape(self) -> tuple[int, int]:
        return min(self.crop, self.source.height), min(self.crop, self.source.width)

    def window(self, row: int, col: int) -> PixelWindow:
        height, width = self.window_shape
        return PixelWindow(self.row_starts[row], self.col_starts[col], height, width)

    def bounds(self, row: int, col: int) -> tuple[float, float, float, float]:
        return self.source.window_bounds(self.window(row, col))

    def footprints_of(self, row: int, cols: np.ndarray) -> np.ndarray:
        """(N, 4, 2) the windows of one grid row on the ground: the affine applied to their four pixel corners
        (top-left, top-right, bottom-right, bottom-left), a rectangle on a north-up grid and the true turned
        quadrilateral on a rotated one, as classify writes its tiles."""
        height, width = self.window_shape
        t = self.source.transform
        col0 = np.asarray([self.col_starts[j] for j in cols], dtype=np.float64)
        row0 = float(self.row_starts[row])
        corners = []
        for dc, dr in ((0, 0), (width, 0), (width, height), (0, height)):
            corners.append(np.stack([t.c + t.a * (col0 + dc) + t.b * (row0 + dr),
                                     t.f + t.d * (col0 + dc) + t.e * (row0 + dr)], axis=-1))
        return np.stack(corners, axis=1).reshape(-1, 4, 2)

    def pixels_of(self, row: int, cols: np.ndarray, dataset) -> np.ndarray:
        """(N, 4) col0, row0, col1, row1 of the windows of one grid row in the raster's own (native) pixels,
        where the windows of every level are axis-aligned boxes whatever the raster's rotation."""
        height, width = self.window_shape
        sx, sy = dataset.width / self.source.width, dataset.height / self.source.height
        col0 = np.asarray([self.col_starts[j] for j in cols], dtype=np.float64)
        row0 = np.full(col0.shape, float(self.row_starts[row]))
        return np.stack([col0 * sx, row0 * sy, (col0 + width) * sx, (row0 + height) * sy], axis=1).reshape(-1, 4)

    def overlapping(self, window: PixelWindow | None) -> tuple[list[int], list[int]]:
        """Grid rows and columns whose windows overlap `window` (a window on this level's grid)."""
        height, width = self.window_shape
        if window is None:
            return list(range(len(self.row_starts))), list(range(len(self.col_starts)))
        rows = [i for i, s in enumerate(self.row_starts) if s < window.row_off + window.height
                and s + height > window.row_off]
        cols = [j for j, s in enumerate(self.col_starts) if s < window.col_off + window.width
                and s + width > window.col_off]
        return rows, cols

    def scale_m(self, dataset) -> float:
        """Ground side of this level's windows in metres."""
        return native_gsd_m(dataset) * dataset.width / self.source.width * self.window_shape[1]


@dataclass
class IndexEntries:
    """The embedded windows of an index (or of a part of it), as flat arrays."""

    embeddings: np.ndarray  # (N, PERSPECTIVES, D) float32
    level: np.ndarray       # (N,) level factor
    footprints: np.ndarray  # (N, 4, 2) the windows' corners on the ground, in the raster's CRS
    pixels: np.ndarray      # (N, 4) col0, row0, col1, row1 in the raster's native pixels
    scale_m: np.ndarray     # (N,) ground side of the window in metres

    @property
    def bounds(self) -> np.ndarray:
        """(N, 4) xmin, ymin, xmax, ymax: the envelopes of the footprints (the footprints on a north-up grid)."""
        return footprint_envelopes(self.footprints)


@dataclass
class BuildStats:
    """The windows a build covered, each counted once: embedded by this run, embedded before it (reused),
    or holding no valid pixel (empty, whenever that was found)."""

    computed: int = 0
    reused: int = 0
    empty: int = 0
    seconds: float = 0.0


class SearchIndex:
    """The index of one raster for one model; open with `open_index` (a context manager)."""

    def __init__(self, raster: str | Path, loaded: LoadedModel, source: RasterSource, attention: str = "segearth",
                 batch_size: int | None = None, factors: tuple[int, ...] = LEVEL_FACTORS, half: bool | None = None,
                 notice: Callable[[str], None] | None = None, flags: Collection[str] = ()):
        self.raster = os.fspath(raster)  # as given: a GDAL name reaches GDAL as typed (files.is_gdal_name)
        # What names this raster wherever it is read: its file absolute and resolved, the rest as typed (a
        # subdataset's or an archive's file too: GPKG:a.gpkg:t1 from any folder, /vsizip//abs/a.zip/x.tif).
        self.absolute_name = absolute_raster_name(self.raster)
        self.label = raster_label(self.raster)  # as a sentence names it
        self.loaded = loaded
        self.attention = attention
        if batch_size is None:  # as segment picks it: 8 on the CPU, from the free memory on a GPU
            from .segment import default_batch_size

            batch_size = default_batch_size(loaded.device)
        self.batch_size = check_batch_size(batch_size)
        self.half = half
        self.precision = window_precision(loaded, half)
        # One sentence per batch size that ran out of GPU memory (retry_smaller_batches); printed as a note on
        # stderr unless `notice` takes it. `notices` keeps them all.
        self.notice = notice
        self.notices: list[str] = []
        # The command's options that the sentence when not even one window fits may name (`search` has neither
        # --batch-size nor --half): devices.out_of_memory_advice.
        self.flags = tuple(flags)
        self.dataset = source.dataset
        self.crs = source.crs
        self.band_notices: list[str] = []  # open_index: how the colour bands were guessed (band_choice_warning)
        size = loaded.model.visual.image_size
        crop = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.levels: list[Level] = []
        for factor in factors:
            level_source = RasterSource(source.path, source.dataset, source.bands, 1.0 / factor,
                                        source.value_range, source.palette)
            # A level whose windows would not fit in the raster adds nothing the finer ones lack.
            if factor == factors[0] or min(level_source.height, level_source.width) >= crop:
                self.levels.append(Level(factor, level_source, crop))
        identity = json.dumps({"format": INDEX_FORMAT, "raster": self.absolute_name,
                               "model": model_identity(loaded), "bands": source.bands,
                               "value_range": source.value_range, "attention": attention,
                               "factors": [lv.factor for lv in self.levels],
                               # fp16 windows (autocast on a GPU) never stand in for fp32 ones, nor the reverse;
                               # an fp32 index is keyed as before this entry was added.
                               **({"precision": self.precision}
                                  if self.precision != model_identity(loaded)["precision"] else {})},
                              sort_keys=True, default=str)
        key = hashlib.sha256(identity.encode()).hexdigest()[:24]
        stem = safe_stem(self.absolute_name if is_gdal_name(self.raster) else self.raster)  # one per raster, too
        self.folder = index_root() / f"{stem}-{key}"
        self.rebuilt_reason: str | None = None
        # Windows embedded for an example point (window_embedding) in this run: computed, not reused, in ensure.
        self.embedded_now: set[tuple[int, int, int]] = set()
        self._open_manifest()

    # -- manifest / staleness

    def _open_manifest(self) -> None:
        raster = raster_identity(self.raster, self.dataset)
        # A raster read through GDAL virtual paths has no version to compare: its index is never reused.
        version = identity_digest(raster) if raster is not None else None
        manifest_file = self.folder / "manifest.json"
        manifest, problem = read_manifest(manifest_file)
        # The model as the manifest holds it (JSON): one copied in from another model's index is not this one's.
        model = json.loads(json.dumps(model_identity(self.loaded), default=str))
        if manifest is not None and version is not None and manifest.get("raster_identity") == version \
                and manifest.get("model_identity") != model:
            self.rebuilt_reason = (f"The search index of {self.label} in {self.folder} was built with another model "
                                   "than this one; the index was rebuilt.")
        elif manifest is not None and (version is None or manifest.get("raster_identity") != version):
            self.rebuilt_reason = (
                f"The raster {self.label} (or a file GDAL reads with it: a mask, .aux.xml, overview or VRT "
                "source) changed since its search index was built; the index was rebuilt." if version is not None
                else f"The raster {self.label} is read through GDAL virtual paths, which cannot be checked "
                "for changes; its search index was rebuilt.")
        elif manifest is None and any(self.folder.glob("L*")):
            # Rows without a manifest to say which raster they were embedded from are never trusted.
            self.rebuilt_reason = (f"The search index of {self.label} in {self.folder} {problem}, so its windows "
                                   "could not be checked against the raster; the index was rebuilt.")
        with cache_folder_errors(self.folder):
            if self.rebuilt_reason is not None:
                shutil.rmtree(self.folder)
                manifest = None
            if manifest is None:
                manifest = {
                    "format": INDEX_FORMAT, "raster": self.absolute_name,
                    "raster_sha256": raster["sha256"] if raster is not None else None,
                    "raster_identity": version, "raster_files": raster,
                    "model": self.loaded.name, "weights_sha256": self.loaded.weights_id,
                    "model_identity": model_identity(self.loaded),
                    "attention": self.attention, "perspectives": list(PERSPECTIVES), "precision": self.precision,
                    "crs": self.crs.to_string(),
                    "levels": [{"factor": lv.factor, "width": lv.source.width, "height": lv.source.height,
                                "rows": len(lv.row_starts), "cols": len(lv.col_starts), "crop": lv.crop}
                               for lv in self.levels],
                }
                self.folder.mkdir(parents=True, exist_ok=True)
                write_text_atomically(manifest_file, json.dumps(manifest, indent=1), durable=False)
        self.manifest = manifest

    # -- rows on disk

    def _row_file(self, level: Level, row: int) -> Path:
        return self.folder / f"L{level.factor}" / f"row{row:05d}.npz"

    def _row_tag(self) -> str:
        """What a row file records of the raster version it was embedded from (the manifest's identity)."""
        return str(self.manifest.get("raster_identity"))

    def _read_row(self, level: Level, row: int) -> tuple[np.ndarray | None, np.ndarray]:
        """The embeddings and window states of a grid row; a row file that is missing, damaged (cut
        short, empty, not a zip), of another shape, or embedded from another version of the raster (a
        command still indexing the old file wrote it after another one rebuilt the index for the new file)
        reads as a row not embedded yet, and is redone."""
        path = self._row_file(level, row)
        missing = None, np.zeros(len(level.col_starts), np.uint8)
        try:
            with np.load(path, allow_pickle=False) as data:
                embeddings, state, tag = data["embeddings"], data["state"], str(data["raster_identity"])
        except Exception:  # zipfile.BadZipFile, EOFError (an empty file), OSError, ValueError, KeyError, ...
            return missing
        if tag != self._row_tag():
            return missing
        shape = (len(level.col_starts), len(PERSPECTIVES), self.loaded.model.visual.output_dim)
        if (embeddings.shape != shape or state.shape != (len(level.col_starts),)
                or embeddings.dtype.kind != "f" or state.dtype != np.uint8
                or not np.isin(state, (STATE_MISSING, STATE_EMBEDDED, STATE_EMPTY)).all()):
            return missing
        return embeddings, state

    def _write_row(self, level: Level, row: int, embeddings: np.ndarray, state: np.ndarray) -> None:
        path = self._row_file(level, row)
        with cache_folder_errors(self.folder):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path, durable=False) as staged:
                np.savez(staged, embeddings=embeddings, state=state, raster_identity=np.array(self._row_tag()))

    # -- building

    def level_cells(self, level: Level, bbox, bbox_crs: str | None) -> list[tuple[int, list[int]]]:
        """The grid rows of `level` whose windows meet the bbox, each with its columns that do: windows over the
        pixels under one of the bbox's parts (its two strips, not the width between them, for a box across the
        antimeridian of a world raster), and on a rotated grid (where those pixels are a part's envelope) only
        the windows whose footprint meets the box itself. Without a bbox, every window."""
        if bbox is None:
            rows, cols = level.overlapping(None)
            return [(row, cols) for row in rows]
        found: dict[int, set[int]] = {}
        for window in request_windows(level.source, bbox, bbox_crs):
            rows, cols = level.overlapping(window)
            for row in rows:
                found.setdefault(row, set()).update(cols)
        cells = [(row, sorted(found[row])) for row in sorted(found)]
        if not is_rotated(self.dataset.transform):
            return cells
        region = bbox_region(self.dataset.transform, self.dataset.width, self.dataset.height, self.crs, self.label,
                             bbox, bbox_crs)
        kept = []
        for row, cols in cells:
            meets = shapely.intersects(footprint_polygons(level.footprints_of(row, np.asarray(cols))), region)
            if meets.any():
                kept.append((row, [col for col, yes in zip(cols, meets) if yes]))
        return kept

    def missing(self, bbox=None, bbox_crs: str | None = None) -> int:
        """How many windows overlapping bbox are not in the index yet."""
        count = 0
        for level in self.levels:
            for row, cols in self.level_cells(level, bbox, bbox_crs):
                _, state = self._read_row(level, row)
                count += int((state[cols] == STATE_MISSING).sum())
        return count

    def ensure(self, bbox=None, bbox_crs: str | None = None,
               progress: Callable[[int, int], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> BuildStats:
        """Embed every window overlapping bbox (default: the whole raster) that is not in the index yet.

        A whole raster with no window holding a valid pixel is an EmptyResultError (errors.nothing_valid), as
        open_source's decimated sample finds most such rasters: an index with no window to search is no index.
        In a --bbox such an area is the search's notice."""
        started = time.perf_counter()
        stats = BuildStats()
        total = self.missing(bbox, bbox_crs)
        done = 0
        if progress is not None and total:  # nothing to embed is no progress to show
            progress(0, total)
        with bounded_gdal_cache():
            for level in self.levels:
                for row, cols in self.level_cells(level, bbox, bbox_crs):
                    embeddings, state = self._read_row(level, row)
                    todo = [j for j in cols if state[j] == STATE_MISSING]
                    stats.empty += sum(1 for j in cols if state[j] == STATE_EMPTY)
                    stats.reused += sum(1 for j in cols if state[j] == STATE_EMBEDDED
                                        and (level.factor, row, j) not in self.embedded_now)
                    if not todo:
                        continue
                    if embeddings is None:
                        embeddings = np.zeros((len(level.col_starts), len(PERSPECTIVES),
                                               self.loaded.model.visual.output_dim), np.float16)
                    # A chunk's embeddings reach the host while the next chunk runs: no wait per batch.
                    pending: list[Callable[[], int]] = []
                    start = 0
                    while start < len(todo):
                        chunk = todo[start:start + max(CHUNK_WINDOWS, self.batch_size)]
                        start += len(chunk)
                        pending.append(self._embed_chunk(level, row, chunk, embeddings, state, stats, should_cancel))
                        while len(pending) > 1 or (pending and start >= len(todo)):
                            done += pending.pop(0)()
                            if progress is not None:
                                progress(done, total)
                    self._write_row(level, row, embeddings, state)
        if bbox is None and not stats.computed and not stats.reused and not self.embedded_now:
            raise nothing_valid(self.raster, True, INDEX_TASK)
        stats.seconds = time.perf_counter() - started
        return stats

    def _embed_chunk(self, level: Level, row: int, cols: list[int], embeddings: np.ndarray,
                     state: np.ndarray, stats: BuildStats, should_cancel) -> Callable[[], int]:
        """Read the windows `cols` of a grid row and queue the valid ones on the device (the empty ones are marked
        at once); the call returned stores their embeddings once they reach the host, and says how many windows
        the chunk had."""
        height, width = level.window_shape
        first = level.col_starts[cols[0]]
        strip_width = level.col_starts[cols[-1]] + width - first
        rgb, valid = level.source.read(PixelWindow(level.row_starts[row], first, height, strip_width))
        queued: list[tuple[int, np.ndarray]] = []
        for j in cols:
            part = slice(level.col_starts[j] - first, level.col_starts[j] - first + width)
            if valid[:, part].any():
                queued.append((j, rgb[:, :, part]))
            else:
                state[j] = STATE_EMPTY
                stats.empty += 1
        copied = self._embed_crops([crop for _, crop in queued], should_cancel) if queued else None

        def store() -> int:
            if copied is not None:
                for (j, _), vector in zip(queued, copied()):
                    embeddings[j] = vector.astype(np.float16)
                    state[j] = STATE_EMBEDDED
                stats.computed += len(queued)
            return len(cols)

        return store

    def _embed_crops(self, crops: list[np.ndarray], should_cancel) -> Callable[[], np.ndarray]:
        """The embeddings of `crops` (embed_windows), in batches of batch_size, on their way to the host: a batch
        that runs out of GPU memory is run again at half the size, as are the batches after it (one sentence
        each time, `notice`)."""
        def attempt(batch_size: int) -> Callable[[], np.ndarray]:
            self.batch_size = batch_size
            parts = []
            for start in range(0, len(crops), batch_size):
                if should_cancel is not None and should_cancel():
                    raise CancelledError("The indexing was cancelled; the windows indexed so far are kept.")
                with batch_step(batch_size):
                    parts.append(window_embeddings(self.loaded, np.stack(crops[start:start + batch_size]),
                                                   self.attention, self.half))
            return host_copy(parts[0] if len(parts) == 1 else torch.cat(parts))

        return retry_smaller_batches(attempt, self.batch_size, self._retrying, self.flags)

    def _retrying(self, sentence: str) -> None:
        self.notices.append(sentence)
        if self.notice is not None:
            self.notice(sentence)
        else:
            print(f"Note: {sentence}", file=sys.stderr)

    def window_embedding(self, level: Level, row: int, col: int, should_cancel=None) -> tuple[np.ndarray | None, int]:
        """The image embedding of one window (embedded now if it is not in the index yet), or None when
        the window holds no valid pixel; and how many windows were embedded for it (0 or 1)."""
        embeddings, state = self._read_row(level, row)
        computed = 0
        if state[col] == STATE_MISSING:
            if embeddings is None:
                embeddings = np.zeros((len(level.col_starts), len(PERSPECTIVES),
                                       self.loaded.model.visual.output_dim), np.float16)
            stats = BuildStats()
            with bounded_gdal_cache():
                self._embed_chunk(level, row, [col], embeddings, state, stats, should_cancel)()
            self._write_row(level, row, embeddings, state)
            computed = stats.computed
            self.embedded_now.add((level.factor, row, col))
        if state[col] != STATE_EMBEDDED or embeddings is None:
            return None, computed
        return embeddings[col, 0].astype(np.float32), computed

    # -- reading

    def entries(self, bbox=None, bbox_crs: str | None = None, factors: tuple[int, ...] | None = None
                ) -> IndexEntries:
        """The embedded windows overlapping bbox (default: all), at the given levels (default: all)."""
        chunks, levels, footprints, pixels, scales = [], [], [], [], []
        for level in self.levels:
            if factors is not None and level.factor not in factors:
                continue
            scale = level.scale_m(self.dataset)
            for row, cols in self.level_cells(level, bbox, bbox_crs):
                cols_array = np.asarray(cols, dtype=np.intp)
                embeddings, state = self._read_row(level, row)
                if embeddings is None:
                    continue
                keep = cols_array[state[cols_array] == STATE_EMBEDDED]
                if keep.size == 0:
                    continue
                chunks.append(embeddings[keep].astype(np.float32))
                levels.append(np.full(keep.size, level.factor))
                footprints.append(level.footprints_of(row, keep))
                pixels.append(level.pixels_of(row, keep, self.dataset))
                scales.append(np.full(keep.size, scale))
        dim = self.loaded.model.visual.output_dim
        if not chunks:
            return IndexEntries(np.zeros((0, len(PERSPECTIVES), dim), np.float32), np.zeros(0, int),
                                np.zeros((0, 4, 2)), np.zeros((0, 4)), np.zeros(0))
        return IndexEntries(np.concatenate(chunks), np.concatenate(levels), np.concatenate(footprints),
                            np.concatenate(pixels), np.concatenate(scales))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def window_count(self) -> int:
        return sum(len(lv.row_starts) * len(lv.col_starts) for lv in self.levels)


def read_manifest(path: Path) -> tuple[dict | None, str]:
    """An index's manifest, or None and what is wrong with it (as the end of a sentence's subject)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "has no manifest"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None, "has a manifest that is not valid JSON"
    except OSError as error:
        return None, f"has a manifest that cannot be read ({error.strerror or error})"
    if not isinstance(manifest, dict):
        return None, "has a manifest that is not a JSON object"
    return manifest, ""


@contextlib.contextmanager
def cache_folder_errors(folder: Path) -> Iterator[None]:
    """A cache folder that cannot be made or written (FARSLIP_CACHE names a file, no permission, a full
    disk) ends the run with a sentence naming it: the index is where index and search keep their work."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else ""
        raise InputError(f"The search index cannot be written in {folder}: {reason}{where}. The cache folder "
                         f"{cache_dir()} (FARSLIP_CACHE) must be a folder this user can write to, on a disk "
                         "with free space; point FARSLIP_CACHE at another folder.") from error


def safe_stem(path: str | Path) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(path).stem)[:40] or "raster"


@contextlib.contextmanager
def open_index(raster: str | Path, loaded: LoadedModel, bands: list[int] | None = None,
               value_range: tuple[float, float] | None = None, attention: str = "segearth",
               batch_size: int | None = None, half: bool | None = None,
               notice: Callable[[str], None] | None = None, flags: Collection[str] = ()) -> Iterator[SearchIndex]:
    """Open (creating, or rebuilding when the raster changed) the search index of `raster` for a model. Batches of
    `batch_size` windows (default: as segment picks it); `half` False keeps a GPU in fp32 (window_precision);
    `notice` hears each retry after the GPU ran out of memory (default: a note on stderr); the sentence when not even
    one window fits names only the options among `flags` (the command's own, e.g. ("--batch-size", "--device"))."""
    with bounded_gdal_cache():
        chosen = bands_for(raster, bands, loaded)
        source = open_source(raster, chosen, None, None, value_range, task=INDEX_TASK)
        with source:
            index = SearchIndex(raster, loaded, source, attention, batch_size, half=half, notice=notice, flags=flags)
            index.band_notices = band_choice_warning(source.dataset, chosen)
            yield index


@contextlib.contextmanager
def bounded_gdal_cache() -> Iterator[None]:
    """GDAL's block cache defaults to 5 % of RAM and would grow with the raster (the decimated sample
    read when opening touches every block): a fixed cache keeps memory flat. A user's GDAL_CACHEMAX wins."""
    if "GDAL_CACHEMAX" in os.environ:
        yield
        return
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        yield


def check_bbox(index: SearchIndex, bbox, bbox_crs: str | None) -> None:
    """Refuse a bbox outside the raster (check_bbox_on)."""
    check_bbox_on(index.levels[0].source, index.label, bbox, bbox_crs)


def check_bbox_on(source: RasterSource, name: str, bbox, bbox_crs: str | None) -> None:
    """Refuse a bad bbox, or one off the raster, with the raster module's sentence; on a rotated grid, one that
    misses the raster's footprint (it may meet its envelope) with a sentence that names the footprint's corners,
    not the envelope, which holds places off the raster. `source` reads the raster at its native resolution."""
    if bbox is None:
        request_window(source, bbox, bbox_crs)
        return
    try:
        request_window(source, bbox, bbox_crs)
    except InputError as error:
        if not (is_rotated(source.transform) and str(error).startswith("The bbox does not overlap")):
            raise
        bbox_region(source.transform, source.width, source.height, source.crs, name, bbox, bbox_crs)
        raise  # (bbox_region refuses it first: the box misses the footprint as it misses the envelope's pixels)
    bbox_region(source.transform, source.width, source.height, source.crs, name, bbox, bbox_crs)


def footprint_polygons(footprints: np.ndarray) -> np.ndarray:
    """(N,) counter-clockwise polygons (as shapely.box makes them) of (N, 4, 2) window corners."""
    footprints = np.asarray(footprints, dtype=np.float64).reshape(-1, 4, 2)
    if not len(footprints):
        return np.array([], dtype=object)
    return np.asarray(shapely.orient_polygons(shapely.polygons(footprints)), dtype=object)


def footprint_envelopes(footprints: np.ndarray) -> np.ndarray:
    """(N, 4) xmin, ymin, xmax, ymax of (N, 4, 2) window corners."""
    footprints = np.asarray(footprints, dtype=np.float64).reshape(-1, 4, 2)
    return np.concatenate([footprints.min(axis=1), footprints.max(axis=1)], axis=1)


def bbox_region(transform, width: int, height: int, crs, name: str, bbox, bbox_crs: str | None):
    """The part of the raster's footprint under the bbox (in bbox_crs, default the raster's), a shapely geometry;
    None without a bbox. One polygon per part of the box in the raster's CRS (raster.bbox_parts_in_raster_crs),
    never their envelope: a box across the antimeridian of a world raster is two strips at its west and east
    edges, a GeometryCollection of both (shapely.get_parts gives them back). InputError when they do not meet:
    on a rotated grid a box may meet the raster's envelope (which request_window checks) and miss the raster
    itself."""
    if bbox is None:
        return None
    envelope = pixel_envelope(transform, 0, 0, width, height)
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    parts = bbox_parts_in_raster_crs((xmin, ymin, xmax, ymax), parse_crs(bbox_crs, crs), crs, envelope)
    footprint = raster_footprint(transform, width, height)
    pieces = []
    for part in parts:  # cut to the raster's envelope first: GEOS loses a box of +-1e308 in the intersection
        box = (max(part[0], envelope[0]), max(part[1], envelope[1]), min(part[2], envelope[2]),
               min(part[3], envelope[3]))
        if box[0] < box[2] and box[1] < box[3]:
            piece = footprint.intersection(shapely.box(*box))
            if not piece.is_empty and piece.area > 0:
                pieces.append(piece)
    if not pieces:
        raise InputError(outside_bbox_sentence(name, transform, width, height, crs))
    return pieces[0] if len(pieces) == 1 else shapely.GeometryCollection(pieces)


def describe(index: SearchIndex, stats: BuildStats | None = None) -> dict:
    """Facts about an index for reports and the CLI."""
    info = {"folder": str(index.folder), "windows": index.window_count(), "size_bytes": index.size_bytes(),
            "levels": [{"factor": lv.factor, "windows": len(lv.row_starts) * len(lv.col_starts),
                        "scale_m": round(lv.scale_m(index.dataset), 3)} for lv in index.levels],
            "perspectives": list(PERSPECTIVES), "precision": index.precision, "batch_size": index.batch_size,
            "rebuilt": index.rebuilt_reason}
    if stats is not None:
        info.update(computed=stats.computed, reused=stats.reused, empty=stats.empty,
                    seconds=round(stats.seconds, 3),
                    windows_per_s=round(stats.computed / stats.seconds, 2) if stats.seconds > 0 else None)
    return info


EDGE_TOLERANCE = 1e-6  # pixels: a point given as the raster's bounds, after the inverse affine's rounding


def _onto_raster(position: float, size: int) -> float:
    """A pixel position on the closed span [0, size] (within EDGE_TOLERANCE) moved inside the last pixel's
    half-open span; one beyond it as it is."""
    if -EDGE_TOLERANCE <= position <= size + EDGE_TOLERANCE:
        return min(max(position, 0.0), math.nextafter(float(size), 0.0))
    return position


def point_window(index: SearchIndex, level: Level, x: float, y: float) -> tuple[int, int] | None:
    """The grid (row, col) of `level` whose window contains (x, y) (raster CRS) with the nearest centre. A point on
    the raster's outer edge (its right or bottom side too, as the raster's bounds give it) is on the raster."""
    col_f, row_f = ~level.source.transform @ (x, y)
    col_f, row_f = _onto_raster(col_f, level.source.width), _onto_raster(row_f, level.source.height)
    height, width = level.window_shape
    best, best_distance = None, math.inf
    for i, rs in enumerate(level.row_starts):
        if not rs <= row_f < rs + height:
            continue
        for j, cs in enumerate(level.col_starts):
            if cs <= col_f < cs + width:
                distance = math.hypot(rs + height / 2 - row_f, cs + width / 2 - col_f)
                if distance < best_distance:
                    best, best_distance = (i, j), distance
    return best


def outside_raster(x: float, y: float, name: str, transform, width: int, height: int, crs) -> InputError:
    """The sentence for a point (raster CRS) that lies off a raster of `width` x `height` pixels. A rotated
    grid's envelope holds places off the raster (the refused point among them): its sentence names the
    footprint's corners instead."""
    point = coordinates(crs, x, y, point=True)
    if is_rotated(transform):
        return InputError(f"The point {point} is outside the footprint of the raster {name}, whose grid is rotated: "
                          f"its corners are {corner_text(crs, raster_corners(transform, width, height))} "
                          f"in {crs_label(crs)}.")
    left, bottom, right, top = pixel_envelope(transform, 0, 0, width, height)
    return InputError(f"The point {point} is outside the raster {name}, which covers "
                      f"x {coordinates(crs, left, right)}, y {coordinates(crs, bottom, top)} in {crs_label(crs)}.")


def check_point(index: SearchIndex, x: float, y: float) -> None:
    if point_window(index, index.levels[0], x, y) is None:
        raise outside_raster(x, y, index.label, index.dataset.transform, index.dataset.width,
                             index.dataset.height, index.crs)
