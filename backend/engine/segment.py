"""`segment`: a GeoTIFF + class lines -> class polygons (and optional class / probability rasters).

The data's way: raster (windows, bands, stretch) -> engine (crops, logits,
blending) -> class and score rasters written block by block -> polygons ->
files, every file written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from backend import __version__
from .checks import check_inputs, class_lines_of, earlier_coarse_warning, output_paths
from .files import absolute_outputs, absolute_raster_name
from .sliding import CHUNK_COLUMNS, NODATA_CLASS, UNCLASSIFIED, Segmenter, count_crops, predict_blocks
from .encoders import Encoder, crop_size
from .feature_cache import FeatureCache, code_identity, opened_raster_identity, raster_scopes
from .finetuned import bands_for, trained_resolution_said, with_trained_resolution
from .runtimes import CPU_BATCH, make_encoder
from .errors import CancelledError, InputError, nothing_valid
from .colours import class_colormap, write_category_names
from .atomic import StagedOutputs
from .export import check_field_widths, check_format_crs, driver_for, layer_name, report_json, write_polygons
from .diskspace import check_free_space, check_written, writing_to
from .temporary import make_work_dir, new_run_tag, remove_owned, remove_stale, run_prefixes
from .memory import reused_heap
from .models import LoadedModel
from .options import SegmentOptions, check_language
from .raster import PixelWindow, RasterSource, band_choice_warning, open_source, pixel_size, request_window
from . import outlines as refine_outlines
from .quality import (
    FIELDS,
    SIGNALS,
    PolygonSignals,
    REGION_SCOPE,
    QualityModel,
    calibration_path_for,
    region_agreement,
    region_signals,
    same_classes,
    regions_to_check,
    run_quality_estimate,
)
from .text import TextEmbedder, cut_names_warning, language_warnings
from .presets import parse_class_lines
from .vectorize import finalize, vectorize_class_raster, vectorize_strips


@dataclass
class SegmentResult:
    run_id: str
    outputs: dict[str, str]
    classes: list[dict]
    tiles: int
    timings: dict
    report: dict = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    features: dict = field(default_factory=dict)  # crops whose features came from the cache / the encoder


def segment_warnings(loaded: LoadedModel, classes) -> list[str]:
    """Sentences for the user before a run (segment, classify): languages the model does not read,
    untrained classes. The run's report adds one_class_warning (said after a run that succeeded: a run
    refused midway says only why)."""
    untrained = untrained_class_warning(loaded, classes)
    return language_warnings(loaded, classes) + ([untrained] if untrained else [])


def run_warnings(loaded: LoadedModel, classes, language: str | None = None) -> list[str]:
    """Every warning a finished run reports (segment, classify): segment_warnings, one class alone, class
    names the text tower reads only in part."""
    return segment_warnings(loaded, classes) + one_class_warning(classes) + cut_names_warning(loaded, classes, language)


def one_class_warning(classes) -> list[str]:
    """The classes compete for every pixel (a softmax over them): one class alone wins everywhere."""
    if len(classes) != 1:
        return []
    how = ("gets every pixel with probability 1" if len(classes[0].queries) == 1
           else "gets every pixel (its synonyms only compete among themselves)")
    return [f"Only one class ({classes[0].name!r}): the classes compete for each pixel, so a class alone {how}. "
            "Add the classes it should be told apart from (e.g. what surrounds it, or 'background')."]


def untrained_class_warning(loaded: LoadedModel, classes) -> str | None:
    """A sentence when a fine-tuned model is asked for classes it was not trained on, else None.

    Fine-tuning's dense patch loss trades open-vocabulary behaviour for the trained classes, so
    other classes still run but may do worse than with the base model.
    """
    trained_lines = ((getattr(loaded, "metadata", None) or {}).get("finetuned") or {}).get("class_lines")
    if not trained_lines:
        return None
    trained = {query.lower() for spec in parse_class_lines(trained_lines) for query in spec.queries}
    untrained = [c.name for c in classes if not any(q.lower() in trained for q in c.queries)]
    if not untrained:
        return None
    base = (loaded.metadata.get("finetuned") or {}).get("base_model") or "the base model"
    listed = ", ".join(repr(name) for name in untrained)
    return (f"Model '{loaded.name}' was fine-tuned on {', '.join(trained_lines)}; {listed} "
            f"{'is' if len(untrained) == 1 else 'are'} not among them. Fine-tuning trades open-vocabulary "
            f"behaviour for the trained classes, so results for {'it' if len(untrained) == 1 else 'them'} "
            f"may be worse than with {base}.")


def with_model_defaults(options: SegmentOptions, loaded: LoadedModel) -> SegmentOptions:
    """What the model decides unless the user did: a fine-tuned model's own classes, the ground
    resolution and the bands (when its trainer chose them) it was trained at; the batch size that
    suits the model's device. The options carry what the model decided (square_gsd: how its resolution
    resamples), so they can be applied again (segment_raster does) without changing a thing."""
    options = with_trained_resolution(options, loaded.metadata)  # with how it resamples: options.square_gsd
    changes: dict[str, Any] = {}
    if not class_lines_of(options) and loaded.class_lines:
        changes["class_lines"] = list(loaded.class_lines)
    chosen = bands_for(options.raster, None, loaded) if options.bands is None else None
    if chosen:
        changes["bands"] = chosen
    if options.batch_size is None:
        changes["batch_size"] = default_batch_size(loaded.device)
    return replace(options, **changes) if changes else options


def _raster_profile(source: RasterSource, window, count: int, dtype: str, nodata, scratch: bool = False) -> dict:
    """A tiled GeoTIFF profile; a `scratch` raster (read back by the run, never handed to the user) uses
    ZSTD at its fastest level, which writes and reads several times faster than deflate."""
    compression = {"compress": "zstd", "zstd_level": 1} if scratch else {"compress": "deflate"}
    return {
        "driver": "GTiff", "width": window.width, "height": window.height, "count": count,
        "dtype": dtype, "nodata": nodata, "crs": source.crs, "transform": source.window_transform(window),
        "tiled": True, "blockxsize": 256, "blockysize": 256, "BIGTIFF": "IF_SAFER", **compression,
    }


def strip_rows_for(window, chunk_columns: int | None = None) -> int:
    """Rows per polygonising strip: at most ~2 Mpx, so memory does not grow with the width either
    (strips are at most one of the engine's column chunks wide)."""
    return int(min(1024, max(64, 2_000_000 // min(window.width, chunk_columns or CHUNK_COLUMNS))))


GDAL_CACHE_MB = 64
# The engine's code and libraries as this process loaded them key its cached features (a server's, taken as it
# starts: an upgrade on disk under it does not key what the loaded code computes as the new code's).
code_identity()
SKIPPED_CLASSES = (NODATA_CLASS, UNCLASSIFIED)


class _StripRows:
    """A strip's rows, gathered block by block into arrays that are used again for later strips.

    Fresh arrays for every strip, or the blocks' own arrays kept until their strip is polygonised,
    each made the kernel hand out new pages (a quarter of a 4096x4096 run's memory was faulted in
    again page by page); a buffer is reused once nothing refers to it any more.
    """

    def __init__(self, rows: int, width: int):
        self.classes = np.empty((rows, width), np.uint8)
        self.scores = np.empty((rows, width), np.float32)
        self.signals = np.empty((2, rows, width), np.float32)
        self._unreferenced = self._references()  # before any view of them exists

    @property
    def capacity(self) -> tuple[int, int]:
        return self.classes.shape

    def _references(self) -> int:
        return max(sys.getrefcount(self.classes), sys.getrefcount(self.scores), sys.getrefcount(self.signals))

    def in_use(self) -> bool:
        """Whether a strip handed over (or a row of it) still refers to these arrays: a numpy view or
        slice holds a reference to the array it views (numpy points every view at the array owning the
        memory), so there are no more references than right after creation once every strip cut from
        them is gone. Counted the same way both times: how many a call itself holds differs between
        Python versions."""
        return self._references() > self._unreferenced

    def put(self, at: int, classes: np.ndarray, scores: np.ndarray, signals: np.ndarray) -> None:
        rows = slice(at, at + len(classes))
        self.classes[rows], self.scores[rows], self.signals[:, rows] = classes, scores, signals


class StripPolygons:
    """Polygonises finished rows in a worker thread while the engine computes the next ones.

    The engine's blocks come column chunk by column chunk, each top to bottom; a chunk's rows are
    gathered into strips of `strip_rows` and handed over through a queue of two strips, so memory
    stays bounded; the result is the one vectorize_class_raster gives for the whole window.
    A strip is handed over once the row below it is known, with that row (which stays for the next
    strip): the worker can finish the strip's outline at once instead of waiting for the next strip.
    Each block's rows are copied into strip arrays used again and again (_StripRows) as it comes.
    """

    # Strip arrays kept for reuse: those of the strips queued, worked on and looked ahead of (vectorize's
    # STRIP_THREADS), and the one being filled.
    KEPT = 8

    def __init__(self, transform, width: int, strip_rows: int, should_cancel: Callable[[], bool] | None):
        self.strip_rows = strip_rows
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._buffers: list[_StripRows] = []
        self._filling: _StripRows | None = None
        self._row0 = self._col0 = 0
        self._gathered = 0  # rows in self._filling
        self._tallest = 1  # the tallest block so far
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="farslip-polygons")
        # The worker takes the strips from the queue until None comes.
        self._result = self._pool.submit(vectorize_strips, iter(self._queue.get, None), transform, width,
                                         SKIPPED_CLASSES, should_cancel)

    def _put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._result.done():
                    self._result.result()  # the worker failed: raise its error here
                    return

    def _free_buffer(self, rows: int, width: int) -> _StripRows:
        """Strip arrays of at least `rows` rows and exactly `width` columns that no strip refers to."""
        for buffer in self._buffers:
            if buffer is not self._filling and buffer.capacity[1] == width and buffer.capacity[0] >= rows \
                    and not buffer.in_use():
                return buffer
        # Room for a strip and the tallest block so far beyond it (gathering stops past strip_rows).
        buffer = _StripRows(max(rows, self.strip_rows + self._tallest), width)
        self._buffers.append(buffer)
        if len(self._buffers) > self.KEPT:  # forget one no strip refers to (its memory goes with the last)
            spare = [b for b in self._buffers if b is not buffer and b is not self._filling and not b.in_use()]
            if spare:
                self._buffers.remove(spare[0])
        return buffer

    def add(self, block, signals: np.ndarray) -> None:
        """A block's class ids and scores, and their (2, h, w) margin and entropy."""
        if self._gathered and self._col0 != block.col0:
            self._hand_over()  # a new column chunk starts at the top again
        height, width = block.class_ids.shape
        self._tallest = max(self._tallest, height)
        if self._gathered == 0:
            self._row0, self._col0 = block.row0, block.col0
        filling = self._filling
        if filling is None or filling.capacity[1] != width or filling.capacity[0] < self._gathered + height:
            grown = self._free_buffer(self._gathered + height, width)
            if filling is not None and self._gathered:
                gathered = self._gathered
                grown.put(0, filling.classes[:gathered], filling.scores[:gathered], filling.signals[:, :gathered])
            self._filling = filling = grown
        filling.put(self._gathered, block.class_ids, block.score, signals)
        self._gathered += height
        if self._gathered > self.strip_rows:
            self._hand_over(keep_last_row=True)

    def _hand_over(self, keep_last_row: bool = False) -> None:
        """Hand the gathered rows over: all of them where the column chunk ends, else all but the last,
        which goes along as the row below the strip and stays to begin the next one."""
        filling, gathered = self._filling, self._gathered
        if filling is None or not gathered:
            return
        self._gathered = 0
        if keep_last_row and gathered > 1:
            last = gathered - 1
            below = (filling.classes[last], filling.scores[last])
            self._put((self._row0, self._col0, filling.classes[:last], filling.scores[:last],
                       filling.signals[:, :last], below))
            self._filling = following = self._free_buffer(self.strip_rows + 1, filling.capacity[1])
            following.put(0, filling.classes[last:gathered], filling.scores[last:gathered],
                          filling.signals[:, last:gathered])
            self._row0, self._gathered = self._row0 + last, 1
        else:
            self._put((self._row0, self._col0, filling.classes[:gathered], filling.scores[:gathered],
                       filling.signals[:, :gathered], None))
            self._filling = None

    def finish(self) -> list:
        self._hand_over()
        self._put(None)
        try:
            return self._result.result()
        finally:
            self._pool.shutdown()

    def abandon(self) -> None:
        self._gathered = 0
        if not self._result.done():
            self._put(None)
        self._pool.shutdown()


def segment_raster(options: SegmentOptions, loaded: LoadedModel,
                   progress: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   feature_cache: FeatureCache | None = None, encoder: Encoder | None = None,
                   notice: Callable[[str], None] | None = None, run_tag: str | None = None,
                   stage: Callable[[str], None] | None = None,
                   inform: Callable[[str], None] | None = None) -> SegmentResult:
    """Segment `options.raster` into the classes of `options`; write its outputs; return what was written.

    With a `feature_cache`, crops whose features are known (same file, grid, weights, attention and
    encoder) skip the image encoder; `encoder` replaces the one options.runtime picks (benchmarks).
    notice(sentence) hears about runtime fallbacks; stage(sentence) what the run does after its last tile
    ("Making polygons.", "Checking regions.", "Writing the outputs."); inform(sentence) what is worth a line but
    is no warning (auto's one-time timing of the runtimes, with its figures). Temporary files carry `run_tag`
    (default: a new one for this process, see backend.engine.temporary). Outputs appear only at the end, each by one
    rename. (The model is the caller's: options.model, weights and half say which one it loaded.)
    """
    # GDAL's block cache defaults to 5 % of RAM and would grow with the raster; a fixed cache keeps
    # memory flat (a GDAL_CACHEMAX set by the user wins).
    settings: dict[str, object] = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB * 2**20}
    # Decompress (and compress) GeoTIFF blocks on every core: reading runs beside the model.
    settings.setdefault("GDAL_NUM_THREADS", os.environ.get("GDAL_NUM_THREADS", "ALL_CPUS"))
    run_tag = run_tag or new_run_tag()
    targets = output_paths(options)
    for folder in {path.parent for path in targets.values()}:
        remove_stale(folder)
    try:
        with rasterio.Env(**settings), reused_heap():
            return _segment_raster(options, loaded, progress, should_cancel, feature_cache, encoder, notice,
                                   run_tag, stage or (lambda _sentence: None), inform)
    finally:
        remove_owned(run_prefixes(list(targets.values()), run_tag))


def estimated_output_mb(window, n_classes: int, probabilities: bool, class_raster: bool = True,
                        scratch: bool = True, prob_dtype: str = "float32") -> float:
    """Uncompressed size of the rasters a run writes: the class raster (uint8) when asked for or when
    the polygons are made from files (`scratch`, with the score raster, float32), probabilities (float32 as
    computed, and then the --prob-dtype copy beside it while a uint8 or float16 one is written)."""
    copy = {"uint8": 1, "float16": 2}.get(prob_dtype, 0)
    bytes_per_pixel = ((1 if class_raster or scratch else 0) + (4 if scratch else 0)
                       + ((4 + copy) * n_classes if probabilities else 0))
    return window.width * window.height * bytes_per_pixel / 2**20


def _segment_raster(options: SegmentOptions, loaded: LoadedModel, progress: Callable[[int, int], None] | None,
                    should_cancel: Callable[[], bool] | None, feature_cache: FeatureCache | None,
                    encoder: Encoder | None, notice: Callable[[str], None] | None, run_tag: str,
                    stage: Callable[[str], None], inform: Callable[[str], None] | None = None) -> SegmentResult:
    started = time.perf_counter()
    # Idempotent: options the caller already gave the model's defaults are the same options. A resolution
    # the model sets keeps the raster's pixel shape unless it was trained on square pixels (square_gsd).
    given, options = options, with_model_defaults(options, loaded)
    check_inputs(options, read_raster=False)  # the raster is read next, with its own checks
    if options.quality_calibration:  # made for this model: told before the dense pass, not after it
        QualityModel.load(Path(options.quality_calibration), loaded.weights_id, class_lines_of(options))
    refine_outlines.check(options.refine, options.sam_model)  # SAM's weights too: before the dense pass
    assert options.batch_size is not None, "with_model_defaults chose the batch size"
    raster = options.raster
    classes = parse_class_lines(class_lines_of(options))
    check_field_widths(options.out, [c.name for c in classes])
    warnings = run_warnings(loaded, classes, check_language(options.language))
    warnings += earlier_coarse_warning(options.out, options.refine)  # read before this run's report replaces it
    run_id = uuid.uuid4().hex[:12]
    timings: dict[str, float] = {}
    targets = output_paths(options)

    with contextlib.ExitStack() as opened:
        def opener() -> RasterSource:
            with trained_resolution_said(options.model or loaded.name, given, options):
                return opened.enter_context(open_source(raster, options.bands, options.scale, options.gsd_m,
                                                        options.value_range, options.square_gsd))

        # With a cache, the raster's files are hashed as it is opened (the key of its features).
        source, identity = opened_raster_identity(raster, opener) if feature_cache is not None else (opener(), None)
        warnings += check_format_crs(options.out, source.crs)
        warnings += band_choice_warning(source.dataset, options.bands)
        window = request_window(source, options.bbox, options.bbox_crs, clip=True)
        warnings += simplify_warning(options.simplify, source, window)
        computed = refine_outlines.engine_window(options.refine, source, window)
        # Without refinement, the window is polygonised beside the engine, from its blocks: then no
        # score or signals raster is needed, and a class raster only when the user asked for one.
        streams = options.refine == "none" and computed == window
        needed_mb = estimated_output_mb(window, len(classes), bool(options.prob_raster), bool(options.class_raster),
                                        scratch=not streams, prob_dtype=options.prob_dtype)
        check_free_space(targets.values(), needed_mb)
        crop = crop_size(loaded.model.visual)
        total = count_crops(source.height, source.width, computed, crop, crop // 2)
        t0 = time.perf_counter()
        heard: list[str] = []  # runtime notices, for the report's warnings too

        def hear(sentence: str) -> None:
            heard.append(sentence)
            if notice is not None:
                notice(sentence)

        encoder = encoder or make_encoder(loaded, options.attention, options.runtime, notice=hear, inform=inform,
                                          crops=total,
                                          raster_shape=(source.height, source.width))
        timings["encoder_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        segmenter = Segmenter(loaded, classes, options.attention, options.batch_size, options.threshold,
                              encoder=encoder,
                              embedder=TextEmbedder(loaded, language=check_language(options.language),
                                                    should_cancel=should_cancel))
        timings["text_s"] = time.perf_counter() - t0
        # The quality estimate's region checks run the global image path (or a benchmark's stand-in).
        embed_regions = getattr(segmenter.encoder, "embed_images", None)
        if feature_cache is not None:  # the raster's files were hashed once, as it was opened
            [dense_scope] = raster_scopes(source, loaded, [(options.attention, segmenter.encoder.name)], identity)
            segmenter.use_cache(feature_cache, dense_scope)
        # The data first, the report (the marker of a finished run) last, all or nothing. The write check sits
        # inside the staged outputs, so it sees the full disk (or a failed rename) before staged files go.
        with StagedOutputs({key: targets[key] for key in ("class_raster", "prob_raster", "coarse_vector", "vector",
                                                          "report") if key in targets}, run_tag) as staged, \
                writing_to(targets.values(), needed_mb):
            workdir = make_work_dir(Path(options.out).parent, run_tag)
            strip_rows = strip_rows_for(window)
            streamed = (StripPolygons(source.window_transform(window), window.width, strip_rows, should_cancel)
                        if streams else None)
            scratch = not streams
            class_path = workdir / "classes.tif" if scratch or options.class_raster else None
            score_path = workdir / "score.tif" if scratch else None
            signals_path = workdir / "signals.tif" if scratch else None
            prob_path = workdir / "probs.tif" if options.prob_raster or options.refine != "none" else None
            t0 = time.perf_counter()
            try:
                valid_pixels = _write_rasters(segmenter, source, computed, class_path, score_path, prob_path,
                                              classes, progress, should_cancel, signals_path, streamed, window)
            except BaseException:
                if streamed is not None:
                    streamed.abandon()
                raise
            timings["inference_s"] = time.perf_counter() - t0
            timings.update({f"{name}_s": seconds for name, seconds in segmenter.stage_s.items()})
            t0 = time.perf_counter()
            if streamed is not None:
                stage("Making polygons.")
            streamed_regions = streamed.finish() if streamed is not None else None
            timings["polygon_wait_s"] = time.perf_counter() - t0
            refined = None  # streamed: nothing to refine
            if scratch:
                assert class_path is not None and score_path is not None and signals_path is not None
                if options.refine != "none":
                    stage("Refining outlines.")
                refined = refine_outlines.run(options.refine, options.sam_model, loaded.device, source, window,
                                              computed, workdir, class_path, score_path, prob_path, signals_path,
                                              options.threshold, should_cancel)
                class_path, score_path, prob_path = refined.class_path, refined.score_path, refined.prob_path
                assert refined.signals_path is not None, "every refinement passes the signals raster on"
                signals_path = refined.signals_path
                timings.update(refined.timings)
            if valid_pixels == 0:
                raise nothing_valid(raster, window.covers(source.height, source.width), "segment")
            t0 = time.perf_counter()
            if streamed is None:
                stage("Making polygons.")

            def polygons(classes_tif: Path | None, scores_tif: Path | None, found=None,
                         signals_tif: Path | None = None):
                if found is None:
                    assert classes_tif is not None, "without streamed polygons the class raster was written"
                    found = vectorize_class_raster(classes_tif, scores_tif, skip_values=SKIPPED_CLASSES,
                                                   strip_rows=strip_rows, should_cancel=should_cancel,
                                                   signals_path=signals_tif)
                return finalize(found, source.crs, source.window_transform(window),
                                min_area_m2=options.min_area, simplify=options.simplify)

            regions = polygons(class_path, score_path, streamed_regions, signals_path)
            coarse = None
            if "coarse_vector" in targets:
                assert refined is not None and refined.coarse_class_path is not None
                assert refined.coarse_score_path is not None
                coarse = polygons(refined.coarse_class_path, refined.coarse_score_path)
            timings["vectorize_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            stage("Checking regions." if options.region_checks else "Estimating the quality.")
            region_scope = None
            if feature_cache is not None and options.region_checks:
                # The runtime that runs the global path (built now, at the first region check): a compiled one's
                # may have fallen back to torch, whose embeddings must not be kept as that runtime's.
                global_runtime = getattr(segmenter.encoder, "global_runtime", None)
                regions_by = (global_runtime() if global_runtime is not None else
                              segmenter.encoder.name if embed_regions else "torch")
                [region_scope] = raster_scopes(source, loaded, [(REGION_SCOPE, regions_by)], identity)
            estimate = estimate_quality(regions, source, window, segmenter, options.quality_calibration,
                                        class_lines_of(options), [c.name for c in classes], total, should_cancel,
                                        region_checks=options.region_checks, embed=embed_regions,
                                        cache=feature_cache, scope=region_scope)
            timings["quality_s"] = time.perf_counter() - t0
            class_names = [c.name for c in classes]
            stats = _class_stats(regions, class_names)
            warnings += estimate.warnings + nothing_drawn_warning(stats, options.threshold, options.min_area)
            features = {"cached": segmenter.crops_cached, "encoded": segmenter.crops_encoded,
                        "cache": feature_cache.stats() if feature_cache is not None else None}
            t0 = time.perf_counter()
            stage("Writing the outputs.")
            write_polygons(staged["vector"], regions, source.crs, class_names, loaded.name, run_id,
                           extra=estimate.fields, layer=Path(options.out).stem, keep_from=targets["vector"])
            if coarse is not None:
                write_polygons(staged["coarse_vector"], coarse, source.crs, class_names, loaded.name, run_id,
                               layer=targets["coarse_vector"].stem, keep_from=targets["coarse_vector"])
            if options.prob_raster and prob_path is not None:
                deliver_prob_raster(prob_path, staged["prob_raster"], options.prob_dtype)
            if options.class_raster:
                assert class_path is not None, "a class raster is written when asked for"
                shutil.move(class_path, staged["class_raster"])
                write_category_names(staged["class_raster"])
            timings["write_s"] = time.perf_counter() - t0
            timings["total_s"] = time.perf_counter() - started
            paths = absolute_outputs(targets)
            report = {
                "farslip_version": __version__, "run_id": run_id, "raster": absolute_raster_name(raster),
                "model": loaded.name, "weights_sha256": loaded.weights_id,
                "classes": [{"class_id": i, "class": c.name, "queries": list(c.queries)}
                            for i, c in enumerate(classes)],
                "crs": source.crs.to_string(), "bbox": list(source.window_bounds(window)),
                "requested_bbox": list(options.bbox) if options.bbox else None,
                "requested_bbox_crs": options.bbox_crs,
                "pixel_window": {"row_off": window.row_off, "col_off": window.col_off,
                                 "height": window.height, "width": window.width},
                "pixel_size": pixel_size(source.transform), "processing_scale": source.scale_record,
                "bands": source.bands, "value_range": source.value_range,
                "device": str(loaded.device), "encoder": segmenter.encoder.name,
                "features": features, "tiles": total, "crop": segmenter.crop,
                "stride": segmenter.stride, "valid_pixels": int(valid_pixels),
                "options": options.processing(),
                "timings": {k: round(v, 3) for k, v in timings.items()},
                # The polygon layer's name in its file (a GeoPackage may hold other layers, which are kept).
                "layer": layer_name(Path(options.out).stem, driver_for(Path(options.out))),
                "class_stats": stats, "outputs": paths,
                "warnings": warnings + (refined.warnings if refined else []) + heard,
                "quality": estimate.report, **(refined.report if refined else {}),
            }
            staged["report"].write_text(report_json(report), "utf-8")
            check_written(targets.values(), needed_mb)
            if should_cancel is not None and should_cancel():
                raise CancelledError("The run was cancelled; nothing was written.")
            staged.commit()
    return SegmentResult(run_id, paths, stats, total, timings, report, warnings, features)


SHORT_UNITS = {"metre": "m", "meter": "m", "foot": "ft", "us survey foot": "US survey ft"}


def simplify_warning(tolerance: float, source: RasterSource, window: PixelWindow) -> list[str]:
    """A sentence when --simplify (in the raster CRS's units) is more than a quarter of the area's shorter
    side: metres typed for a raster in degrees, say; the polygons then lose most of their shape."""
    width, height = pixel_size(source.window_transform(window))
    side = min(window.width * width, window.height * height)
    if tolerance <= side / 4:
        return []
    named = source.crs.linear_units or "units"
    unit = "degrees" if source.crs.is_geographic else SHORT_UNITS.get(named.lower(), named)
    return [f"--simplify {tolerance:g} is in the units of the raster's CRS ({unit}), and more than a quarter of "
            f"the area's shorter side ({side:.4g} {unit}): the polygons lose most of their shape. Give a tolerance "
            f"of about one pixel ({min(width, height):.4g} {unit}) or a few."]


def nothing_drawn_warning(stats: list[dict], threshold: float, min_area: float) -> list[str]:
    """A run over valid pixels that drew no polygon says which of its options (--threshold, --min-area) left
    nothing (it ended with 0 polygons per class and no word)."""
    if any(entry["polygons"] for entry in stats):
        return []
    cut = [f"no pixel's most likely class reached --threshold {threshold:g}" if threshold else "",
           f"every region was smaller than --min-area {min_area:g} m²" if min_area else ""]
    said = " or ".join(part for part in cut if part)
    if not said:
        return []
    return [f"No polygon was drawn: {said}. Lower {'them' if all(cut) else 'it'} to see classes."]


def _class_stats(regions, class_names: list[str]) -> list[dict]:
    stats: list[dict[str, Any]] = [{"class": name, "class_id": i, "polygons": 0, "area_m2": 0.0}
                                   for i, name in enumerate(class_names)]
    for region in regions:
        entry = stats[region.class_id]
        entry["polygons"] += 1
        entry["area_m2"] += float(region.area_m2)
    for entry in stats:
        entry["area_m2"] = round(entry["area_m2"], 2)
    return stats


PROB_STEPS = 254  # a uint8 probability raster: 0..254 for probabilities 0..1
PROB_NODATA = 255


def deliver_prob_raster(written: Path, target: Path, dtype: str, keep: bool = False) -> None:
    """The run's float32 probability raster `written` at `target` in the --prob-dtype asked for: as it is (moved,
    or copied when `keep`); as float16, IEEE half floats (a Float32 band with NBITS=16, which GDAL stores as 16-bit
    floats and every GDAL, QGIS's too, reads back as Float32), NaN where nodata; or as uint8, value
    round(p * PROB_STEPS), PROB_NODATA where NaN, with the band scale 1/PROB_STEPS that GDAL and QGIS apply when they
    read it. The bands' names and tags are kept."""
    if dtype == "float32":
        (shutil.copyfile if keep else shutil.move)(written, target)
        return
    assert dtype in ("uint8", "float16"), f"a --prob-dtype the option allows: {dtype}"
    with rasterio.open(written) as src:
        if dtype == "float16":
            # Rounded to the nearest half float here: GDAL's own conversion truncates.
            profile = dict(src.profile, dtype="float32", nodata=float("nan"), compress="deflate", nbits=16)
        else:
            profile = dict(src.profile, dtype="uint8", nodata=PROB_NODATA, compress="deflate", predictor=2)
        with rasterio.open(target, "w", **profile) as dst:
            for _, window in src.block_windows(1):
                probs = src.read(window=window)
                if dtype == "float16":
                    dst.write(probs.astype(np.float16).astype(np.float32), window=window)
                    continue
                scaled = np.rint(np.clip(probs, 0.0, 1.0) * PROB_STEPS)
                dst.write(np.where(np.isnan(probs), PROB_NODATA, scaled).astype(np.uint8), window=window)
            if dtype == "uint8":
                dst.scales = (1.0 / PROB_STEPS,) * src.count
                dst.offsets = (0.0,) * src.count
            dst.update_tags(**src.tags())
            for band in range(1, src.count + 1):
                dst.set_band_description(band, src.descriptions[band - 1] or "")
                dst.update_tags(band, **src.tags(band))
    if not keep:
        os.remove(written)


class RunRasters:
    """The class, score, signals and (optional) probability rasters of a run, written block by block.

    The signals raster holds the per-pixel margin and entropy of the class probabilities (quality.py).
    A raster whose path is None is not written.
    """

    def __init__(self, source: RasterSource, window, classes, class_path: Path | None, score_path: Path | None,
                 signals_path: Path | None, prob_path: Path | None):
        n = len(classes)
        self.class_ds = (rasterio.open(class_path, "w", **_raster_profile(source, window, 1, "uint8", NODATA_CLASS))
                         if class_path else None)
        self.score_ds = (rasterio.open(score_path, "w",
                                       **_raster_profile(source, window, 1, "float32", float("nan"), True))
                         if score_path else None)
        self.prob_ds = (rasterio.open(prob_path, "w", **_raster_profile(source, window, n, "float32", float("nan")))
                        if prob_path else None)
        self.signals_ds = (rasterio.open(signals_path, "w",
                                         **_raster_profile(source, window, 2, "float32", float("nan"), True))
                           if signals_path else None)
        for i, spec in enumerate(classes):
            if self.prob_ds is not None:
                self.prob_ds.set_band_description(i + 1, spec.name)
        if self.class_ds is not None:
            self.class_ds.write_colormap(1, class_colormap([c.name for c in classes], UNCLASSIFIED))
            self.class_ds.set_band_description(1, "class_id")
            self.class_ds.update_tags(1, **{f"CLASS_{i}": c.name for i, c in enumerate(classes)},
                                      UNCLASSIFIED=str(UNCLASSIFIED))
        if self.score_ds is not None:
            self.score_ds.set_band_description(1, "score")

    def write(self, row0: int, col0: int, class_ids: np.ndarray, score: np.ndarray, probs: np.ndarray | None,
              signals: np.ndarray) -> None:
        """One block at (row0, col0) of the window; `signals` (2, h, w): its margin and entropy."""
        h, w = class_ids.shape
        win = rasterio.windows.Window(col0, row0, w, h)
        if self.class_ds is not None:
            self.class_ds.write(class_ids, 1, window=win)
        if self.score_ds is not None:
            self.score_ds.write(score, 1, window=win)
        if self.prob_ds is not None:
            self.prob_ds.write(probs, window=win)
        if self.signals_ds is not None:
            self.signals_ds.write(signals, window=win)

    def close(self) -> None:
        for ds in (self.class_ds, self.score_ds, self.signals_ds, self.prob_ds):
            if ds is not None:
                ds.close()


def valid_inside(valid: np.ndarray, row0: int, col0: int, computed: PixelWindow, asked: PixelWindow) -> int:
    """How many of a block's valid pixels lie in the window asked for: the block's `valid` at (row0, col0) of the
    `computed` window, which a refinement widens by its halo around `asked` (the halo's pixels are read for the
    refinement's context, not segmented for the user)."""
    top, left = asked.row_off - computed.row_off - row0, asked.col_off - computed.col_off - col0
    rows = slice(max(top, 0), max(min(top + asked.height, valid.shape[0]), 0))
    cols = slice(max(left, 0), max(min(left + asked.width, valid.shape[1]), 0))
    return int(valid[rows, cols].sum())


def _write_rasters(segmenter: Segmenter, source: RasterSource, window, class_path: Path | None,
                   score_path: Path | None, prob_path: Path | None, classes, progress, should_cancel,
                   signals_path: Path | None = None, streamed: StripPolygons | None = None,
                   asked: PixelWindow | None = None) -> int:
    """Run the engine over `window`, writing each finished block; returns the number of valid pixels (of those
    in `asked`, the window asked for, when `window` is wider)."""
    rasters = RunRasters(source, window, classes, class_path, score_path, signals_path, prob_path)
    segmenter.keep_probs = prob_path is not None  # without a probability raster no block needs them
    valid_pixels = 0
    try:
        for block in predict_blocks(segmenter, source, window, progress, should_cancel):
            started = time.perf_counter()
            signals = block.signals
            assert signals is not None, "the engine's blocks carry their quality signals"
            rasters.write(block.row0, block.col0, block.class_ids, block.score, block.probs, signals)
            valid_pixels += (int(block.valid.sum()) if asked is None or asked == window else
                             valid_inside(block.valid, block.row0, block.col0, window, asked))
            if streamed is not None:
                streamed.add(block, signals)
            segmenter.stage_s["write_blocks"] = segmenter.stage_s.get("write_blocks", 0.0) + \
                time.perf_counter() - started
    finally:
        rasters.close()
    return valid_pixels


@dataclass
class QualityEstimate:
    fields: dict  # polygon field -> values
    report: dict
    warnings: list[str] = field(default_factory=list)


def own_calibration(path: Path | None, weights_id: str | None,
                    class_lines: list[str]) -> tuple[QualityModel, str, list[str]]:
    """The quality calibration a fine-tuned model folder holds (model, its name, what to say of it). A damaged
    one, one made for other weights (a file copied in from another model) or one fitted for other classes than
    `class_lines` is set aside with a warning and the built-in estimate is used: it only weighs the confidence
    figure, and the run (hours on a large raster) is not lost for it."""
    if path is None or not path.is_file():
        return QualityModel(), "default", []
    try:
        model = QualityModel.load(path, weights_id, None)
    except InputError as error:
        return QualityModel(), "default", [f"{error} The quality comes from the built-in estimate; calibrate "
                                           "again with farslip evaluate --calibrate-quality."]
    source_name = os.path.abspath(path)
    if model.class_lines is not None and not same_classes(class_lines, model.class_lines):
        return QualityModel(), "default", [
            f"The model's quality calibration {source_name} was fitted for the classes "
            f"{'; '.join(model.class_lines)}, not this run's, so the quality comes from the built-in "
            "estimate; calibrate for these classes with farslip evaluate --calibrate-quality."]
    return model, source_name, []


def estimate_quality(regions, source: RasterSource, window: PixelWindow, segmenter: Segmenter,
                     named_calibration: str | Path | None, class_lines: list[str],
                     class_names: list[str], dense_crops: int, should_cancel,
                     agreement: Callable[[list, list[int]], np.ndarray] | None = None, region_checks: bool = True,
                     **embedding) -> QualityEstimate:
    """Per-polygon quality signals and `quality`, and the run's estimated mIoU (quality.py).

    `embedding`: how the region checks embed their crops (quality.crop_embeddings: embed, cache, scope);
    `agreement(regions, checked)` replaces the region check run here (backend/scale runs it on a worker);
    `region_checks` False checks no region (region_agr stays empty, as for the polygons never checked)."""
    loaded = segmenter.loaded
    transform = source.window_transform(window)
    values = region_signals(regions)
    started = time.perf_counter()
    checked = regions_to_check(regions, dense_crops) if region_checks else []
    counts = {"cached": 0}
    values["region_agr"] = (agreement(regions, checked) if agreement is not None else
                            region_agreement(regions, source, window, transform, loaded, segmenter.text,
                                             segmenter.owner, should_cancel, only=checked, counts=counts,
                                             **embedding))
    region_s = time.perf_counter() - started
    model_dir = loaded.metadata.get("model_dir")
    calibration = calibration_path_for(Path(model_dir)) if model_dir else None
    if named_calibration:  # a file the user named: it must fit this model and this class list
        calibration = Path(os.path.abspath(named_calibration))
        model = QualityModel.load(calibration, loaded.weights_id, class_lines)
        source_name = str(calibration)
        said: list[str] = []
    else:  # the model's own: set aside with a warning where it does not fit this run
        model, source_name, said = own_calibration(calibration, loaded.weights_id, class_lines)
    quality = model.predict(PolygonSignals(values).matrix()) if regions else np.zeros(0)
    fields = {"quality": quality, **{name: values[name] for name in FIELDS[1:]}}
    report = {"estimated_miou": run_quality_estimate(regions, quality, len(class_names)),
              "calibration": source_name, "signals": list(SIGNALS),
              "region_checks_on": region_checks,  # off (--no-region-checks) is not "no polygon large enough"
              "region_checks": len(checked), "region_cached": counts["cached"], "polygons": len(regions),
              "region_s": round(region_s, 3)}
    return QualityEstimate(fields, report, said)


# Device memory one ViT-B/16 crop needs in a batch at fp16 (activations, attention, upsampled logits),
# with room to spare; the server's out-of-memory retry halves the batch if a model needs more.
GPU_BYTES_PER_CROP = 24 * 2**20


def default_batch_size(device: torch.device, share: float = 1.0) -> int:
    """8 on the CPU (larger batches do not run faster there); on a GPU as many crops as half its free memory
    holds (half of `share` of it: a Ray worker that shares its GPU with others). Free memory includes what
    torch's caching allocator holds without using (an earlier job's), which the driver counts as used."""
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    free += max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(min(256, max(8, free * share // 2 // GPU_BYTES_PER_CROP)))
