"""A Ray worker: the model loaded once, the class lines embedded once, then chunks on request.

`ChunkWorker` is a plain class; run.py turns it into a Ray actor (one per GPU, or per share of
the CPU cores). A chunk is one of the engine's work units (backend.engine.sliding.units), so its
pixels get bit for bit the values a single-process run gives them. What comes back is plain
numpy arrays: the class ids, the top probability, the quality signals (margin, entropy) and, when
the run writes a probability raster, the class probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from backend.engine.quality import region_agreement
from backend.engine.raster import PixelWindow, RasterSource, open_source
from backend.engine.sliding import NODATA_CLASS, Segmenter, predict_blocks

log = logging.getLogger("farslip.scale")


@dataclass
class EngineSettings:
    """What every worker needs to compute chunks exactly as `farslip segment` would."""

    class_lines: list[str]
    model: str | None = None
    weights: str | None = None
    device: str = "auto"
    half: bool = False
    attention: str = "segearth"
    batch_size: int | None = None
    threshold: float = 0.0
    runtime: str = "auto"
    language: str = "auto"
    bands: list[int] | None = None
    scale: float | None = None
    gsd_m: float | None = None
    square_gsd: bool = True  # how gsd_m resamples (raster.processing_scale): a model's own may keep the shape
    value_range: tuple[float, float] | None = None
    chunk_rows: int | None = None
    chunk_columns: int | None = None
    threads: int | None = None  # torch threads per worker (None: torch's default)
    facts: dict = field(default_factory=dict)


def engine_settings(options, device: str = "auto", chunk: int | None = None) -> EngineSettings:
    """The worker settings of a run of `options` (backend.engine.options.SegmentOptions)."""
    from backend.engine.checks import class_lines_of

    return EngineSettings(
        class_lines=class_lines_of(options), model=options.model,
        weights=str(options.weights) if options.weights else None, device=device, half=options.half,
        attention=options.attention, batch_size=options.batch_size, threshold=options.threshold,
        runtime=options.runtime, language=options.language, bands=options.bands, scale=options.scale,
        gsd_m=options.gsd_m, square_gsd=options.square_gsd, value_range=options.value_range, chunk_rows=chunk,
        chunk_columns=chunk)


def ray_gpu() -> float | None:
    """The share of a GPU Ray gave this process (a worker's num_gpus: 1, or 0.5 for two workers on one GPU);
    None outside a Ray worker or without a GPU. Ray lets the worker see only that GPU (CUDA_VISIBLE_DEVICES)."""
    try:
        import ray

        if not ray.is_initialized() or not ray.get_gpu_ids():
            return None
        share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # not a Ray worker (the driver), or no Ray installed
        return None
    return float(share) if share else None


def worker_device(device: str, gpu_share: float | None) -> str:
    """The device a worker runs on for the run's `device`: on a GPU Ray gave it, a CUDA device (auto, cuda or
    cuda:N, whose N is the driver's numbering) is that GPU, the only one the worker sees, cuda:0 there."""
    name = (device or "").strip().lower()
    if gpu_share is not None and (name in ("auto", "cuda") or name.startswith("cuda:")):
        return "cuda:0"
    return device


def load_segmenter(settings: EngineSettings, gpu_share: float | None = None):
    """The loaded model and its Segmenter (class lines embedded), as `farslip segment` builds them.

    `gpu_share`: a Ray worker's share of its GPU (ray_gpu): its device is that GPU, and its default batch
    size is sized from that share of the GPU's free memory (the workers on one GPU start together)."""
    from backend.engine.devices import resolve_device
    from backend.engine.finetuned import trained_resolution
    from backend.engine.models import load_model
    from backend.engine.options import check_language
    from backend.engine.segment import default_batch_size
    from backend.engine.text import TextEmbedder
    from backend.engine.presets import parse_class_lines

    device = resolve_device(worker_device(settings.device, gpu_share))
    loaded = load_model(settings.model, settings.weights, device, half=settings.half)
    # As `segment`: a model's own class lines when none are given, its training resolution by default.
    if not settings.class_lines and loaded.class_lines:
        settings.class_lines = list(loaded.class_lines)
    trained_gsd, square = trained_resolution(loaded.metadata)
    if settings.scale is None and settings.gsd_m is None and trained_gsd:
        settings.gsd_m, settings.square_gsd = trained_gsd, square
    batch = settings.batch_size or default_batch_size(device, gpu_share or 1.0)
    segmenter = Segmenter(loaded, parse_class_lines(settings.class_lines), settings.attention, batch,
                          settings.threshold, embedder=TextEmbedder(loaded, language=check_language(settings.language)))
    return loaded, segmenter


class ChunkWorker:
    def __init__(self, settings: EngineSettings):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.loaded, self.segmenter = load_segmenter(settings, ray_gpu())
        self._sources: dict[str, RasterSource] = {}

    def pid(self) -> int:
        return os.getpid()

    def _source(self, raster: str) -> RasterSource:
        if raster not in self._sources:
            for old in list(self._sources)[:-1]:  # keep at most two rasters open
                self._sources.pop(old).close()
            s = self.settings
            self._sources[raster] = open_source(raster, s.bands, s.scale, s.gsd_m, s.value_range, s.square_gsd)
        return self._sources[raster]

    def _encoder_for(self, raster_crops: int, source: RasterSource) -> None:
        """The encoder `segment` would pick for `source`, a raster of `raster_crops` crops."""
        from backend.engine.runtimes import make_encoder

        # No timing of the runtimes here: workers sharing the cores would time each other, and could pick
        # different runtimes for one output.
        self.segmenter.encoder = make_encoder(self.loaded, self.settings.attention, self.settings.runtime,
                                              crops=raster_crops, raster_shape=(source.height, source.width),
                                              timing=False)

    def run_chunk(self, raster: str, unit: tuple[int, int, int, int], raster_crops: int,
                  with_probs: bool, clip: tuple[tuple[float, float, float, float], ...] | None = None
                  ) -> dict[str, np.ndarray]:
        """The arrays of one work unit (row_off, col_off, height, width) of `raster`'s processing grid.

        `raster_crops` is the whole raster's crop count, from which the runtime is chosen as
        `segment` chooses it (compiled CPU runtimes only for runs large enough to repay them).
        `clip`: the requested boxes (RasterSource.clip: on a rotated grid, across the antimeridian), outside
        which nothing is valid.
        """
        from backend.engine.devices import retry_smaller_batches

        source = self._source(raster)
        source.clip = clip
        window = PixelWindow(*unit)
        self._encoder_for(raster_crops, source)

        def attempt(batch_size: int) -> dict[str, np.ndarray]:
            # A smaller batch that fits is kept for the worker's next chunks.
            self.segmenter.batch_size = batch_size
            return self._chunk_arrays(source, window, with_probs)

        # On a GPU that runs out of memory in the dense pass: again with half the batch, as `segment` does.
        return retry_smaller_batches(attempt, self.segmenter.batch_size, log.warning)

    def _chunk_arrays(self, source: RasterSource, window: PixelWindow, with_probs: bool) -> dict[str, np.ndarray]:
        n = len(self.segmenter.classes)
        class_ids = np.full((window.height, window.width), NODATA_CLASS, np.uint8)
        score = np.full((window.height, window.width), np.nan, np.float32)
        signals = np.full((2, window.height, window.width), np.nan, np.float32)
        probs = np.full((n, window.height, window.width), np.nan, np.float32) if with_probs else None
        valid, block_rows = 0, []
        self.segmenter.keep_probs = with_probs  # as in `segment`: blocks carry probabilities only when asked
        for block in predict_blocks(self.segmenter, source, window, chunk_columns=self.settings.chunk_columns,
                                    chunk_rows=self.settings.chunk_rows):
            h, w = block.class_ids.shape
            rows, cols = slice(block.row0, block.row0 + h), slice(block.col0, block.col0 + w)
            class_ids[rows, cols] = block.class_ids
            score[rows, cols] = block.score
            assert block.signals is not None, "the engine's blocks carry their quality signals"
            signals[:, rows, cols] = block.signals
            if probs is not None:
                probs[:, rows, cols] = block.probs
            valid += int(block.valid.sum())
            block_rows.append(h)
        # The blocks' heights, in order: the driver polygonises them in the strips `segment` forms from them.
        # The encoder that ran them (its runtime), which the run's report names, as `segment`'s does.
        arrays = {"class_ids": class_ids, "score": score, "signals": signals, "valid": np.array(valid),
                  "block_rows": np.array(block_rows, np.int64), "encoder": np.array(self.segmenter.encoder.name)}
        if probs is not None:
            arrays["probs"] = probs
        return arrays

    def region_agreement(self, raster: str, window: tuple[int, int, int, int], regions: list,
                         raster_crops: int) -> np.ndarray:
        """quality.region_agreement for `regions` (the polygons picked for a region check) of `raster`,
        with the image embedder `segment` uses for it."""
        source = self._source(raster)
        pixel_window = PixelWindow(*window)
        self._encoder_for(raster_crops, source)
        return region_agreement(regions, source, pixel_window, source.window_transform(pixel_window), self.loaded,
                                self.segmenter.text, self.segmenter.owner,
                                embed=getattr(self.segmenter.encoder, "embed_images", None))
