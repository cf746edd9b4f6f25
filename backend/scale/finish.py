"""One raster of a scaled run, once all its chunks are in: rasters, polygons, quality, its own layer.

The chunks' blocks are written into the raster's class, score and signals rasters with the same
writer `segment` uses, then polygonised over the same strips, finalised and scored exactly as
`segment` does (the region check runs on a worker, where the model is). So a raster's layer is
the layer `farslip segment` writes for it, feature for feature; the merge (merge.py) only
concatenates these layers. Polygonising the whole class raster once, in strips, keeps polygons
cut by chunk borders whole at no extra cost: a strip seam is merged by the same union as today.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine

from backend.engine.errors import nothing_valid
from backend.engine.export import write_polygons
from backend.engine.feature_cache import RasterReads
from backend.engine.files import raster_label
from backend.engine import outlines as refine_outlines
from backend.engine.raster import PixelWindow, band_choice_warning, open_source, pixel_size
from backend.engine.segment import (SKIPPED_CLASSES, RunRasters, StripPolygons, _class_stats, estimate_quality,
                                    nothing_drawn_warning, simplify_warning, strip_rows_for, valid_inside)
from backend.engine.sliding import NODATA_CLASS, Segmenter
from backend.engine.vectorize import finalize, vectorize_class_raster

from .manifest import Manifest
from .worker import EngineSettings


@dataclass
class RasterPlan:
    """One input raster: its processing window, its work units and crop count."""

    index: int
    path: str
    crs: object
    window: PixelWindow
    units: list[PixelWindow]
    crops: int
    keys: list[str] = field(default_factory=list)
    computed: PixelWindow | None = None  # what the engine computes (window plus --refine edges' halo)
    transform: Affine = field(default_factory=Affine.identity)  # the window's grid (rotated, flipped or north-up)
    clip: tuple[tuple[float, float, float, float], ...] | None = None  # RasterSource.clip: rotated or antimeridian
    # What GDAL read for it when it was planned (feature_cache.raster_reads; None: a name over no file here).
    reads: RasterReads | None = None

    def __post_init__(self):
        if self.computed is None:
            self.computed = self.window

    @property
    def name(self) -> str:
        return raster_label(self.path)  # a file by its name, a GDAL name (GPKG:a.gpkg:t1) whole

    @property
    def pixels(self) -> int:
        return self.window.height * self.window.width


@dataclass
class FinishSettings:
    class_names: list[str]
    class_lines: list[str]
    model_name: str
    run_id: str
    min_area: float = 0.0
    simplify: float = 0.0
    quality_calibration: str | None = None
    with_probs: bool = False
    streamed_columns: int = 0  # the engine's column chunk width (the polygonising strips' width)
    refine: str = "none"
    sam_model: str | None = None
    threshold: float = 0.0
    device: object = "cpu"  # where --refine sam runs: the driver's device, as in `segment`


class _Rows:
    """A stand-in for an engine block: rows of a unit for StripPolygons."""

    def __init__(self, row0: int, col0: int, class_ids: np.ndarray, score: np.ndarray):
        self.row0, self.col0, self.class_ids, self.score = row0, col0, class_ids, score


def finish_raster(plan: RasterPlan, manifest: Manifest, engine: EngineSettings, finish: FinishSettings,
                  segmenter: Segmenter, agreement: Callable[[RasterPlan, list], np.ndarray]) -> dict:
    """Write plan's rasters and polygon layer into its folder of the manifest; return its facts."""
    started = time.perf_counter()
    folder = manifest.raster_folder(plan.index)
    paths = {name: folder / f"{name}.tif" for name in ("classes", "score", "signals")}
    prob_path = folder / "probs.tif" if finish.with_probs or finish.refine != "none" else None
    window, computed = plan.window, plan.computed
    assert computed is not None
    with open_source(plan.path, engine.bands, engine.scale, engine.gsd_m, engine.value_range,
                     engine.square_gsd) as source:
        transform = source.window_transform(window)
        strip_rows = strip_rows_for(window, finish.streamed_columns)
        # As in `segment`: the engine's blocks, unit by unit in its order, polygonised as they are written.
        streamed = StripPolygons(transform, window.width, strip_rows, None) if finish.refine == "none" else None
        rasters = RunRasters(source, computed, segmenter.classes, paths["classes"], paths["score"], paths["signals"],
                             prob_path)
        valid, encoders = 0, set()
        try:
            for key, unit in zip(plan.keys, plan.units):
                arrays = manifest.load_chunk(key)
                if "encoder" in arrays:  # not in a chunk kept by an unfinished run of an earlier version
                    encoders.add(str(arrays["encoder"]))
                row0, col0 = unit.row_off - computed.row_off, unit.col_off - computed.col_off
                rasters.write(row0, col0, arrays["class_ids"], arrays["score"], arrays.get("probs"),
                              arrays["signals"])
                valid += (int(arrays["valid"]) if computed == window else  # not the halo a refinement reads
                          valid_inside(arrays["class_ids"] != NODATA_CLASS, row0, col0, computed, window))
                if streamed is not None:  # the engine's own blocks, in its order: the same strips as segment
                    top = 0
                    for height in arrays["block_rows"]:
                        streamed.add(_Rows(row0 + top, col0, arrays["class_ids"][top:top + height],
                                           arrays["score"][top:top + height]), arrays["signals"][:, top:top + height])
                        top += height
        except BaseException:
            if streamed is not None:
                streamed.abandon()
            raise
        finally:
            rasters.close()
        found = streamed.finish() if streamed is not None else None
        refined = refine_outlines.run(finish.refine, finish.sam_model, finish.device, source, window, computed,
                                      folder, paths["classes"], paths["score"], prob_path, paths["signals"],
                                      finish.threshold)
        if valid == 0:
            raise nothing_valid(plan.path, window.covers(source.height, source.width), "segment")

        def polygons(classes_tif: Path, scores_tif: Path, found=None, signals_tif: Path | None = None):
            if found is None:
                found = vectorize_class_raster(classes_tif, scores_tif, skip_values=SKIPPED_CLASSES,
                                               strip_rows=strip_rows, signals_path=signals_tif)
            return finalize(found, source.crs, transform, min_area_m2=finish.min_area, simplify=finish.simplify)

        assert refined.signals_path is not None, "every refinement passes the signals raster on"
        regions = polygons(refined.class_path, refined.score_path, found, refined.signals_path)
        if refined.coarse_class_path is not None and refined.coarse_score_path is not None:
            write_polygons(folder / "coarse.gpkg", polygons(refined.coarse_class_path, refined.coarse_score_path),
                           source.crs, finish.class_names, finish.model_name, finish.run_id, layer="polygons")

        def remote_check(regions, checked):
            values = np.full(len(regions), np.nan)
            if checked:
                values[checked] = agreement(plan, [regions[i] for i in checked])
            return values

        estimate = estimate_quality(regions, source, window, segmenter, finish.quality_calibration,
                                    finish.class_lines, finish.class_names, plan.crops, None, agreement=remote_check)
        write_polygons(folder / "polygons.gpkg", regions, source.crs, finish.class_names, finish.model_name,
                       finish.run_id, extra=estimate.fields, layer="polygons")
        stats = _class_stats(regions, finish.class_names)
        # The sentences `segment` says of this raster on its own (the run's own, of its classes, are the driver's).
        warnings = (band_choice_warning(source.dataset, engine.bands)
                    + simplify_warning(finish.simplify, source, window) + refined.warnings + estimate.warnings
                    + nothing_drawn_warning(stats, finish.threshold, finish.min_area))
        facts = {
            "path": plan.path, "crs": source.crs.to_string(), "bbox": list(source.window_bounds(window)),
            "pixel_size": pixel_size(source.transform), "processing_scale": source.scale_record,
            "bands": source.bands, "value_range": source.value_range, "tiles": plan.crops,
            "valid_pixels": valid, "class_stats": stats, "warnings": warnings, "encoders": sorted(encoders),
            "quality": estimate.report, "finish_s": round(time.perf_counter() - started, 3), **refined.report,
        }
        # The refined rasters of the request window are the raster's class and probability rasters.
        if refined.class_path != paths["classes"]:
            refined.class_path.replace(paths["classes"])
        if prob_path is not None and refined.prob_path is not None and refined.prob_path != prob_path:
            refined.prob_path.replace(prob_path)
    return facts
