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

from backend.engine.errors import EmptyResultError
from backend.engine.export import write_polygons
from backend.engine.raster import PixelWindow, open_source
from backend.engine.segment import (SKIPPED_CLASSES, RunRasters, StripPolygons, _class_stats, estimate_quality,
                                    strip_rows_for)
from backend.engine.sliding import Segmenter
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

    @property
    def name(self) -> str:
        return Path(self.path).name

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
    streamed_columns: int = 0  # windows at most this wide were polygonised from the engine's blocks by segment


class _Rows:
    """A stand-in for an engine block: full-width rows for StripPolygons."""

    col0 = 0

    def __init__(self, class_ids: np.ndarray, score: np.ndarray):
        self.class_ids, self.score = class_ids, score


def finish_raster(plan: RasterPlan, manifest: Manifest, engine: EngineSettings, finish: FinishSettings,
                  segmenter: Segmenter, agreement: Callable[[RasterPlan, list], np.ndarray]) -> dict:
    """Write plan's rasters and polygon layer into its folder of the manifest; return its facts."""
    started = time.perf_counter()
    folder = manifest.raster_folder(plan.index)
    paths = {name: folder / f"{name}.tif" for name in ("classes", "score", "signals")}
    prob_path = folder / "probs.tif" if finish.with_probs else None
    window = plan.window
    with open_source(plan.path, engine.bands, engine.scale, engine.gsd_m, engine.value_range) as source:
        transform = source.window_transform(window)
        strip_rows = strip_rows_for(window)
        streamed = (StripPolygons(transform, strip_rows, None) if window.width <= finish.streamed_columns else None)
        rasters = RunRasters(source, window, segmenter.classes, paths["classes"], paths["score"], paths["signals"],
                             prob_path)
        valid = 0
        try:
            for key, unit in zip(plan.keys, plan.units):
                arrays = manifest.load_chunk(key)
                row0, col0 = unit.row_off - window.row_off, unit.col_off - window.col_off
                rasters.write(row0, col0, arrays["class_ids"], arrays["score"], arrays.get("probs"),
                              arrays["signals"])
                valid += int(arrays["valid"])
                if streamed is not None:  # the engine's own blocks, in its order: the same strips as segment
                    top = 0
                    for height in arrays["block_rows"]:
                        streamed.add(_Rows(arrays["class_ids"][top:top + height], arrays["score"][top:top + height]))
                        top += height
        except BaseException:
            if streamed is not None:
                streamed.abandon()
            raise
        finally:
            rasters.close()
        found = streamed.finish() if streamed is not None else None
        if valid == 0:
            raise EmptyResultError(f"The requested area of {plan.path} holds only nodata or masked pixels: "
                                   "there is nothing to segment. Choose another extent.")
        if found is None:
            found = vectorize_class_raster(paths["classes"], paths["score"], skip_values=SKIPPED_CLASSES,
                                           strip_rows=strip_rows)
        regions = finalize(found, source.crs, transform, min_area_m2=finish.min_area, simplify=finish.simplify)

        def remote_check(regions, checked):
            values = np.full(len(regions), np.nan)
            if checked:
                values[checked] = agreement(plan, [regions[i] for i in checked])
            return values

        estimate = estimate_quality(regions, source, window, segmenter, paths["score"], paths["signals"],
                                    finish.quality_calibration, finish.class_lines, finish.class_names, plan.crops,
                                    None, agreement=remote_check)
        write_polygons(folder / "polygons.gpkg", regions, source.crs, finish.class_names, finish.model_name,
                       finish.run_id, extra=estimate.fields, layer="polygons")
        facts = {
            "path": plan.path, "crs": source.crs.to_string(), "bbox": list(source.window_bounds(window)),
            "pixel_size": [source.transform.a, -source.transform.e], "processing_scale": source.scale,
            "bands": source.bands, "value_range": source.value_range, "tiles": plan.crops,
            "valid_pixels": valid, "class_stats": _class_stats(regions, finish.class_names),
            "quality": estimate.report, "finish_s": round(time.perf_counter() - started, 3),
        }
    return facts
