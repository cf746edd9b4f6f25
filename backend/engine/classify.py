"""`classify`: zero-shot scene classification of a raster's tiles (the image-level counterpart of segment).

Tiles of `tile` native pixels on a grid anchored at the raster's top-left corner (edge tiles are
cut by the raster), each resized to the model's input and embedded by CLIP's image path. A tile's
class probabilities are the softmax over all class queries (80 prompt templates each) of the cosine
times the model's own learned logit scale, then the maximum over each class's synonyms
(FARSLIP_METHOD.md section 2). Tiles with no valid pixel are left out; with a bbox, so are tiles holding
no pixel of the request, the pixels segment classifies for that bbox: on a north-up grid every pixel the
box reaches, one it covers in part included (raster.bounds_window rounds outward); on a rotated grid the
pixels whose centre lies in the box itself, not its envelope; two strips for a box across the
antimeridian of a world raster. Each tile is written as its
footprint on the ground, the affine applied to its four pixel corners: a rectangle on a north-up
raster, the true (turned) quadrilateral on a rotated one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely

from backend import __version__
from .atomic import StagedOutputs
from .devices import batch_step, retry_smaller_batches
from .diskspace import writing_to
from .errors import CancelledError, InputError, nothing_valid
from .export import check_field_widths, check_format_crs, report_json, report_path_for, write_layer
from .files import absolute_outputs, absolute_raster_name, raster_file
from .models import LoadedModel
from .finetuned import bands_for
from .raster import PixelWindow, band_choice_warning, open_source, request_window, request_windows
from .search import check_hits_output
from .search_index import bounded_gdal_cache, embed_windows
from .text import TextEmbedder, class_probabilities, logit_scale, query_index
from .presets import parse_class_lines

TILE_FIELDS = ("class", "class_id", "prob", "model", "run_id")


@dataclass
class ClassifyOptions:
    class_lines: list[str]
    tile: int = 224
    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    bands: list[int] | None = None
    value_range: tuple[float, float] | None = None
    batch_size: int | None = None  # as segment picks it: 8 on the CPU, from the free memory on a GPU


@dataclass
class ClassifyResult:
    run_id: str
    outputs: dict[str, str]
    classes: list[dict]
    tiles: int
    report: dict = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def validate_classify_options(options: ClassifyOptions) -> None:
    parse_class_lines(options.class_lines)
    if not 16 <= options.tile <= 8192:
        raise InputError(f"--tile must be between 16 and 8192 pixels; got {options.tile}.")


def tile_starts(start: int, stop: int, tile: int) -> list[int]:
    """Starts of the raster-anchored tiles (multiples of `tile`) that overlap [start, stop)."""
    return list(range((start // tile) * tile, stop, tile))


def bbox_tiles(windows: list[PixelWindow], tile: int) -> dict[int, list[int]]:
    """The raster-anchored tiles over any of `windows` (raster.request_windows: one per part of the bbox, two
    strips for a box across the antimeridian of a world raster, not the width between them): their row starts,
    in order, each with its column starts."""
    grid: dict[int, set[int]] = {}
    for window in windows:
        cols = tile_starts(window.col_off, window.col_off + window.width, tile)
        for row in tile_starts(window.row_off, window.row_off + window.height, tile):
            grid.setdefault(row, set()).update(cols)
    return {row: sorted(grid[row]) for row in sorted(grid)}


def check_classify_output(out: Path, overwrite: bool, options: ClassifyOptions,
                          inputs: dict[str, Path] | None = None) -> None:
    """The tiles layer and its report can be written (never over an input), and hold every class name."""
    check_hits_output(out, overwrite, inputs)
    check_field_widths(out, [c.name for c in parse_class_lines(options.class_lines)])


def tile_footprint(transform, tile: PixelWindow) -> list[tuple[float, float]]:
    """The four corners of a tile on the ground (the affine applied to its pixel corners), a closed ring."""
    corners = [(tile.col_off, tile.row_off), (tile.col_off + tile.width, tile.row_off),
               (tile.col_off + tile.width, tile.row_off + tile.height), (tile.col_off, tile.row_off + tile.height)]
    ring = [tuple(transform @ corner) for corner in corners]
    return ring + ring[:1]


def classify_raster(raster: str | Path, options: ClassifyOptions, out: Path, loaded: LoadedModel,
                    overwrite: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None,
                    notice: Callable[[str], None] | None = None,
                    flags: Collection[str] = ("--device",)) -> ClassifyResult:
    """Classify `raster`'s tiles (module doc). On a GPU a batch of tiles that runs out of memory runs again at
    half the size, as do the batches after it (devices.retry_smaller_batches): one sentence per retry among the
    warnings, said as it happens to `notice`; the sentence when not even one tile fits names only the options
    among `flags` (`farslip classify` has --device, not --batch-size nor --half)."""
    started = time.perf_counter()
    validate_classify_options(options)
    file = raster_file(raster)  # a subdataset's file or an archive; none for a virtual path over no file here
    check_classify_output(out, overwrite, options, {"raster": file} if file else {})
    classes = parse_class_lines(options.class_lines)
    from .segment import default_batch_size, run_warnings  # the same sentences and batch as segment's

    warnings = run_warnings(loaded, classes)
    queries, query_owner = query_index(classes)
    owner = np.asarray(query_owner)
    text = TextEmbedder(loaded, should_cancel=should_cancel).embed(queries).numpy()
    scale = logit_scale(loaded)
    boxes, class_ids, probs = [], [], []
    batch_size = options.batch_size if options.batch_size is not None else default_batch_size(loaded.device)

    def retrying(sentence: str) -> None:
        warnings.append(sentence)
        if notice is not None:
            notice(sentence)

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        """The image embeddings of same-shaped `crops`; a batch too big for the GPU's memory run again in halves
        (whose size the later batches keep)."""
        def attempt(size: int) -> np.ndarray:
            nonlocal batch_size
            batch_size = size
            parts = []
            for start in range(0, len(crops), size):
                with batch_step(size):  # only the batch's model step: an out-of-memory error elsewhere is no batch's
                    parts.append(embed_windows(loaded, np.stack(crops[start:start + size]))[:, 0])
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        return retry_smaller_batches(attempt, batch_size, retrying, flags)

    with bounded_gdal_cache():
        bands = bands_for(raster, options.bands, loaded)
        source = open_source(raster, bands, None, None, options.value_range, task="classify")
        with source:
            warnings += check_format_crs(out, source.crs)
            warnings += band_choice_warning(source.dataset, bands)
            # With clip, a tile none of whose pixel centres lies in the box (on a rotated grid, where the window
            # is the box's envelope in pixels) reads as invalid and is left out.
            window = request_window(source, options.bbox, options.bbox_crs, clip=True)
            grid = bbox_tiles(request_windows(source, options.bbox, options.bbox_crs), options.tile)
            total, done = sum(len(cols) for cols in grid.values()), 0
            if progress is not None:
                progress(0, total)
            for row, cols in grid.items():
                pending: list[tuple[PixelWindow, np.ndarray]] = []
                for col in cols:
                    tile = PixelWindow(row, col, min(options.tile, source.height - row),
                                       min(options.tile, source.width - col))
                    rgb, valid = source.read(tile)
                    if valid.any():
                        pending.append((tile, rgb))
                start = 0
                while start < len(pending):  # in batches of batch_size, which a retry on a GPU halves
                    if should_cancel is not None and should_cancel():
                        raise CancelledError("The classification was cancelled; nothing was written.")
                    batch = pending[start:start + batch_size]
                    start += len(batch)
                    # Edge tiles have their own shapes: embed them one by one, full tiles together.
                    groups: dict[tuple[int, int], list[int]] = {}
                    for i, (_, rgb) in enumerate(batch):
                        groups.setdefault(rgb.shape[1:], []).append(i)
                    for members in groups.values():
                        image = embed([batch[i][1] for i in members])
                        per_class = class_probabilities(image, text, owner, len(classes), scale)
                        for i, row_probs in zip(members, per_class):
                            boxes.append(tile_footprint(source.transform, batch[i][0]))
                            class_ids.append(int(row_probs.argmax()))
                            probs.append(float(row_probs.max()))
                done += len(cols)
                if progress is not None:
                    progress(done, total)
            crs, bands = source.crs, list(source.bands)
    if not boxes:
        raise nothing_valid(raster, window.covers(source.height, source.width), "classify")
    run_id = uuid.uuid4().hex[:12]
    names = [c.name for c in classes]
    out = Path(out)
    counts = np.bincount(class_ids, minlength=len(classes))
    stats = [{"class": name, "class_id": i, "tiles": int(counts[i])} for i, name in enumerate(names)]
    outputs = absolute_outputs({"vector": out, "report": report_path_for(out)})
    report = {"farslip_version": __version__, "run_id": run_id, "raster": absolute_raster_name(raster),
              "model": loaded.name, "weights_sha256": loaded.weights_id, "crs": crs.to_string(),
              "bands": bands, "tile": options.tile, "logit_scale": scale, "tiles": len(boxes), "class_stats": stats,
              "warnings": warnings, "outputs": outputs, "total_s": 0.0}
    # The tiles, then their report (the marker of a finished run), renamed in together: all or nothing.
    with StagedOutputs({"vector": out, "report": report_path_for(out)}) as staged, \
            writing_to([out, report_path_for(out)], 1.0):
        _write_tiles(staged["vector"], boxes, class_ids, probs, names, crs, loaded.name, run_id, layer=out.stem,
                     keep_from=out)
        report["total_s"] = round(time.perf_counter() - started, 3)
        staged["report"].write_text(report_json(report), "utf-8")
        staged.commit()
    return ClassifyResult(run_id, outputs, stats, len(boxes), report, warnings)


def _write_tiles(path: Path, footprints: list[list[tuple[float, float]]], class_ids: list[int], probs: list[float],
                 names: list[str], crs, model: str, run_id: str, layer: str | None = None,
                 keep_from: Path | None = None) -> None:
    count = len(class_ids)
    columns = (np.array([names[i] for i in class_ids], dtype=object), np.asarray(class_ids, np.int32),
               np.asarray(probs, np.float64), np.array([model] * count, dtype=object),
               np.array([run_id] * count, dtype=object))
    # Counter-clockwise exterior rings, as the rectangles of search hits (shapely.box) are.
    geometries = shapely.orient_polygons(shapely.polygons(np.asarray(footprints, dtype=np.float64)))
    write_layer(Path(path), np.asarray(geometries, dtype=object), dict(zip(TILE_FIELDS, columns)), "Polygon", crs,
                layer=layer, keep_from=keep_from)
