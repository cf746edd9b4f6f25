"""Class raster -> one polygon per connected region of each class, with score statistics.

The raster is read in horizontal strips so memory does not grow with its height. Each strip's
regions (4-connected pixels of one class) are labelled and polygonised (_strip_polygons); regions
of the same class that touch across a strip seam are then merged, so a region spanning many strips
is still exactly one feature.

Polygons are built and merged in pixel coordinates (integer corners, exact in floating point) and
mapped to the raster's CRS with its affine transform at the end: the union along a seam is then
exact, and neighbouring polygons share bit-identical vertices.

The quality estimate's pixel signals of each region are summed in the same pass (quality.py): the
mean margin and entropy of its pixels (from a two-band signals raster) and the mean gradient of the
score on its outline pixels (those with a 4-neighbour of another class or outside the raster). Each
strip sees the row above and below it, so a seam changes none of these values.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from shapely.geometry.base import BaseGeometry

from backend.engine.cores import usable_cores
from backend.engine.errors import CancelledError, InputError
from backend.engine.ground import TRUE_SCALE_TOLERANCE, as_pyproj, ellipsoid_areas, geodesic_areas, keeps_areas
from backend.engine.polygonize import region_polygons


# Regions joined across seams at the end of a run: this many at a time, each in a thread of its own.
JOIN_THREADS = min(4, usable_cores())
# Threads drawing the polygons of the strips ahead (_polygonised): none on a machine with two cores or
# fewer, where the engine's threads keep them busy already.
STRIP_THREADS = min(3, max(0, usable_cores() // 2 - 1))


@dataclass(frozen=True)
class RegionPolygon:
    """One connected region of one class. `geometry` is in the class raster's CRS."""

    geometry: BaseGeometry
    class_id: int
    pixel_count: int
    score_sum: float
    score_max: float
    area_m2: float = math.nan
    margin: float = math.nan     # mean (top-1 - top-2) class probability of its pixels
    entropy: float = math.nan    # mean normalised entropy of the class probabilities of its pixels
    sharpness: float = math.nan  # mean gradient magnitude of the score on its outline pixels

    @property
    def score_mean(self) -> float:
        return self.score_sum / self.pixel_count if self.pixel_count else math.nan


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        root = item
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while item != root:
            self.parent[item], item = root, self.parent.get(item, item)
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


class _Runs:
    """A strip's regions (4-connected pixels of one class, `skip` left out), found through its runs:
    the maximal pieces of a row with one class value.

    Two runs of one class in neighbouring rows that share a column are connected, so the regions are
    the connected components of a graph of runs (scipy.sparse.csgraph), numbered 1..n by their first
    pixel in the strip's reading order; `region_ids` gives each pixel its region (0 = no region). A
    class map that is smooth at the patch scale has few runs per row, so per-region sums and maxima
    are reduced along each run (one sequential pass over the pixels) and only the runs are spread
    over the regions.
    """

    def __init__(self, classes: np.ndarray, skip: set[int]):
        width = classes.shape[1]
        flat = classes.ravel()
        change = np.empty(flat.size, dtype=bool)
        if flat.size:
            change[0] = True
            np.not_equal(flat[1:], flat[:-1], out=change[1:])
            change[::width] = True  # a run never crosses a row's end
        self.starts = np.flatnonzero(change)
        run_class = flat[self.starts]
        # An overlap of two runs in rows r-1 and r begins where either of them begins.
        below = np.flatnonzero(change[width:] | change[:-width]) + width
        below = below[flat[below] == flat[below - width]]
        runs = len(self.starts)
        # The run of a pixel, looked up for the overlaps only: numbering every pixel's run (a cumulative
        # sum over the strip) took half of this step.
        upper, lower = (np.searchsorted(self.starts, at, side="right") - 1 for at in (below - width, below))
        links = coo_matrix((np.ones(len(below), np.int8), (upper, lower)), shape=(runs, runs))
        count, component = connected_components(links.tocsr(), directed=False)
        kept = ~np.isin(run_class, list(skip))
        used = np.zeros(count, dtype=bool)
        used[component[kept]] = True  # components are numbered by their first run: so are the regions
        number = np.cumsum(used, dtype=np.int64)
        self.ids = np.where(kept, number[component], 0)  # of each run
        self.n = int(number[-1]) if count else 0
        self.region_classes = np.zeros(self.n, dtype=np.int64)
        self.region_classes[self.ids[kept] - 1] = run_class[kept]
        lengths = np.diff(self.starts, append=flat.size)
        self.region_ids = np.repeat(self.ids.astype(np.int32), lengths).reshape(classes.shape)
        self.counts = np.bincount(self.ids, weights=lengths, minlength=self.n + 1)[1:].astype(np.int64)

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per region 1..n, the float64 sum of `values` over its pixels (NaN if one is NaN)."""
        along = np.add.reduceat(values.ravel(), self.starts, dtype=np.float64) if len(self.starts) else np.zeros(0)
        return np.bincount(self.ids, weights=along, minlength=self.n + 1)[1:]

    def maxima(self, values: np.ndarray) -> np.ndarray:
        """Per region 1..n, the largest of `values` over its pixels, as float64 (NaN if one is NaN)."""
        maxima = np.full(self.n + 1, -np.inf)
        if len(self.starts):
            # NaN (nodata, mostly in runs of no region) propagates as documented; numpy's note on it is no
            # line for the user's terminal.
            with np.errstate(invalid="ignore"):
                run_maxima = np.maximum.reduceat(values.ravel(), self.starts).astype(np.float64)
                np.maximum.at(maxima, self.ids, run_maxima)
        return maxima[1:]


def _strip_polygons(classes: np.ndarray, skip: set[int], col0: int, row0: int) -> tuple[_Runs, np.ndarray]:
    """A strip's regions (_Runs) and the polygon of each, in raster pixel coordinates (the strip's
    first pixel at `col0`, `row0`)."""
    runs = _Runs(classes, skip)
    values, shapes = region_polygons(runs.region_ids, Affine.translation(col0, row0))
    assert len(shapes) == runs.n, "every region is exactly one shape"
    polygons = np.empty(runs.n, dtype=object)
    polygons[values - 1] = shapes
    return runs, polygons


def _region_sums(runs: _Runs, values: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per region: the sum of its `values` and how many there are, NaN left out.

    NaN marks pixels without a value (nodata), which usually belong to no region: the sums are taken
    over all runs at once (id 0, "no region", collects them) and redone pixel by pixel without NaN
    only if a region's sum came out NaN.
    """
    n = runs.n
    if values is None:
        return np.zeros(n), np.zeros(n)
    sums = runs.sums(values)
    if not np.isnan(sums).any():
        return sums, runs.counts.astype(np.float64)
    flat_ids, values = runs.region_ids.ravel(), values.ravel()
    present = ~np.isnan(values)
    sums = np.bincount(flat_ids[present], weights=values[present], minlength=n + 1)[1:]
    return sums, (runs.counts - np.bincount(flat_ids[~present], minlength=n + 1)[1:]).astype(np.float64)


class _ScoresAround:
    """A strip's scores at strip positions that may lie one row above or below it (the neighbouring strips'
    rows, where known) or one column to its left (the previous column chunk's last column; NaN at its
    corners). NaN marks no score (nodata): a gradient does not reach across it (see `gradient`).

    Looked up at the outline pixels' neighbours only: stacking the rows and column around the whole
    strip and replacing its NaN copied every pixel three times over, for gradients at a few of them.
    """

    def __init__(self, scores: np.ndarray, above, below, left):
        self.scores = scores
        self.above = above[1] if above is not None else None
        self.below = below[1] if below is not None else None
        self.left = left[1] if left is not None else None
        height, width = scores.shape
        # The first and last row and column there are values for.
        self.rows = (-1 if above is not None else 0, height if below is not None else height - 1)
        self.cols = (-1 if left is not None else 0, width - 1)

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        height = self.scores.shape[0]
        out = np.full(len(rows), np.nan, np.float32)
        inside = (rows >= 0) & (rows < height) & (cols >= 0)
        out[inside] = self.scores[rows[inside], cols[inside]]
        for line, picked, along in ((self.above, (rows < 0) & (cols >= 0), cols),
                                    (self.below, (rows >= height) & (cols >= 0), cols),
                                    (self.left, (cols < 0) & (rows >= 0) & (rows < height), rows)):
            if line is not None:
                out[picked] = line[along[picked]]
        out[np.isinf(out)] = np.nan
        return out

    def gradient(self, rows: np.ndarray, cols: np.ndarray, axis: int) -> np.ndarray:
        """np.gradient along `axis` (0: rows) over all the values there are, only at (rows, cols): central
        inside, one-sided at the raster's ends and beside a pixel without a score (nodata: its border is
        not an edge of the image), 0 where neither neighbour has one."""
        lo, hi = self.rows if axis == 0 else self.cols
        if hi - lo < 1:
            return np.zeros(len(rows), np.float32)
        at = (rows, cols)[axis]
        before, after = [rows, cols], [rows, cols]
        before[axis] = np.maximum(at - 1, lo)
        after[axis] = np.minimum(at + 1, hi)
        return one_sided_where_missing(self(*before), self(rows, cols), self(*after),
                                       at - before[axis], after[axis] - at)


def one_sided_where_missing(before: np.ndarray, centre: np.ndarray, after: np.ndarray, back, ahead) -> np.ndarray:
    """The difference quotient across a pixel from the neighbours `back` and `ahead` pixels away (0 or 1) that
    have a value (finite), else from the pixel itself: central, one-sided, or 0 with neither."""
    has_before, has_after = np.isfinite(before), np.isfinite(after)
    back = np.where(has_before, back, 0)
    ahead = np.where(has_after, ahead, 0)
    span = (back + ahead).astype(np.float32)
    low = np.where(has_before, before, centre)
    high = np.where(has_after, after, centre)
    with np.errstate(invalid="ignore", divide="ignore"):
        quotient = (high - low) / span
    return np.where((span > 0) & np.isfinite(quotient), quotient, 0.0).astype(np.float32)


def _outline_sums(region_ids: np.ndarray, classes: np.ndarray, scores: np.ndarray | None, above, below, left,
                  defer_right: bool, n: int) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """Per region: the sum of the score's gradient magnitude over its outline pixels, and their number.

    `above` / `below`: (classes, scores) of the row just outside the strip, None at the raster's edge;
    `left`: (classes, scores) of the column just left of it, None at the raster's edge.
    The gradient is np.gradient's of the score on the whole raster, one-sided beside nodata (NaN). With
    `defer_right` (a column chunk that is not the last) the last column's pixels are left out and
    returned instead, with what they need of their right neighbours (_edge_outline).
    """
    if scores is None:
        return np.zeros(n), np.zeros(n), None
    height, width = classes.shape
    # `other`: the class differs above, below or to the left (outside the raster counts as different);
    # compared in the classes' own type, so no class value can pass for another or for the outside.
    other = np.empty((height, width), bool)
    vertical = classes[1:] != classes[:-1]
    other[1:] = vertical
    other[0] = False
    other[:-1] |= vertical
    other[0] |= True if above is None else above[0] != classes[0]
    other[-1] |= True if below is None else below[0] != classes[-1]
    horizontal = classes[:, 1:] != classes[:, :-1]
    other[:, 0] |= True if left is None else left[0] != classes[:, 0]
    other[:, 1:] |= horizontal
    other_last = other[:, -1].copy()
    outline = other
    outline[:, :-1] |= horizontal  # the class differs to the right, too
    # The last column: the raster's edge, or (deferred) its right neighbours are the next chunk's.
    outline[:, -1] = not defer_right
    outline &= region_ids > 0
    around = _ScoresAround(scores, above, below, left)
    r, c = np.nonzero(outline)
    magnitude = np.hypot(around.gradient(r, c, 1), around.gradient(r, c, 0))
    ids = region_ids[r, c]
    pending = None
    if defer_right:
        at_rows, last = np.arange(height), np.full(height, width - 1)
        has_left = width - 2 >= around.cols[0]
        pending = {"score": around(at_rows, last),
                   "left": around(at_rows, last - 1) if has_left else np.full(height, np.nan, np.float32),
                   "has_left": np.full(height, has_left),
                   "gy": around.gradient(at_rows, last, 0),
                   "other": other_last}
    return (np.bincount(ids, weights=magnitude.astype(np.float64), minlength=n + 1)[1:],
            np.bincount(ids, minlength=n + 1)[1:].astype(np.float64), pending)


def _edge_outline(edge: dict, rows: slice, right_classes: np.ndarray, right_scores: np.ndarray):
    """The outline pixels of a chunk's last column (rows `rows`) once the next chunk's first column
    (their right neighbours) is known: (region index, gradient magnitude) of each."""
    ids = edge["ids"][rows]
    outline = (ids >= 0) & (edge["other"][rows] | (edge["classes"][rows] != right_classes))
    right = np.asarray(right_scores, np.float32)
    gx = one_sided_where_missing(edge["left"][rows], edge["score"][rows], right,
                                 edge["has_left"][rows].astype(np.int64), np.ones(len(right), np.int64))
    return ids[outline], np.hypot(gx, edge["gy"][rows])[outline]


def _valid_polygon(geometry: BaseGeometry) -> BaseGeometry:
    # Pixel-edge rings can touch themselves at a corner; rebuilding on the pixel grid fixes that.
    return shapely.union_all([shapely.make_valid(geometry)], grid_size=1)


def _to_crs_coordinates(geometries: Sequence[BaseGeometry], transform: Affine) -> list[BaseGeometry]:
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f

    def apply(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])

    return list(shapely.transform(np.asarray(geometries, dtype=object), apply))


def vectorize_class_raster(
    class_path: Path,
    score_path: Path | None = None,
    skip_values: Iterable[int] = (255,),
    strip_rows: int = 1024,
    should_cancel: Callable[[], bool] | None = None,
    signals_path: Path | None = None,
) -> list[RegionPolygon]:
    """Polygons of the connected regions of band 1 of `class_path`, one per region and class.

    `score_path` (band 1, same grid) gives each region's score_sum, score_max and sharpness, and
    `signals_path` (bands margin, entropy) its margin and entropy (NaN without them).
    Pixels whose value is in `skip_values` or is the raster's nodata value give no polygons.
    """
    assert strip_rows > 0
    skip = {int(value) for value in skip_values}
    with rasterio.open(class_path) as classes_ds:
        if classes_ds.nodata is not None and float(classes_ds.nodata).is_integer():
            skip.add(int(classes_ds.nodata))
        with contextlib.ExitStack() as opened:
            scores_ds, signals_ds = (opened.enter_context(rasterio.open(path)) if path is not None else None
                                     for path in (score_path, signals_path))
            for ds, path, what in ((scores_ds, score_path, "score"), (signals_ds, signals_path, "signals")):
                if ds is not None and ds.shape != classes_ds.shape:
                    raise InputError(
                        f"The {what} raster {path} is {ds.width}x{ds.height} pixels but the class raster "
                        f"{class_path} is {classes_ds.width}x{classes_ds.height}; they must match."
                    )
            strips = _dataset_strips(classes_ds, scores_ds, signals_ds, strip_rows)
            found = _strip_regions(strips, skip, should_cancel, classes_ds.width)
            transform = classes_ds.transform
    return _merged_regions(found, transform)


# (first row, first column, classes, scores or None, signals (2, rows, columns: margin, entropy) or None),
# optionally followed by the row just below the strip, (classes, scores or None), or None where the strip
# ends its column chunk. A strip without that sixth item is held until the next one shows its first row.
Strip = tuple


def vectorize_strips(strips: Iterable[Strip], transform: Affine, width: int, skip_values: Iterable[int] = (255,),
                     should_cancel: Callable[[], bool] | None = None) -> list[RegionPolygon]:
    """As vectorize_class_raster, for strips of a raster `width` pixels wide, given column chunk by
    column chunk (left to right), each chunk's strips top to bottom (full-width strips: one chunk).

    Lets `segment` polygonise finished rows in a worker thread while the engine computes the next ones.
    """
    return _merged_regions(_strip_regions(strips, {int(v) for v in skip_values}, should_cancel, width), transform)


def _dataset_strips(classes_ds, scores_ds, signals_ds, strip_rows: int):
    width = classes_ds.width
    for row_start in range(0, classes_ds.height, strip_rows):
        window = Window(0, row_start, width, min(strip_rows, classes_ds.height - row_start))
        classes = classes_ds.read(1, window=window)
        scores = scores_ds.read(1, window=window) if scores_ds is not None else None
        signals = signals_ds.read((1, 2), window=window) if signals_ds is not None else None
        yield row_start, 0, classes, scores, signals


def _in_context(strips: Iterable[Strip]):
    """Each strip with the (classes, scores) row just above and below it in its column chunk (None at
    the raster's edges: a chunk runs from the top row to the bottom one).

    A strip that brings its row below (a sixth item) is yielded as soon as it comes; one without it
    waits for the next strip's first row.
    """
    def row(strip, index):  # copies: a strip's arrays may be reused once the strip is done with
        return strip[2][index].copy(), (strip[3][index].copy() if strip[3] is not None else None)

    above = pending = None
    for strip in strips:
        if pending is not None:
            same_chunk = strip[1] == pending[1]
            yield pending, above, row(strip, 0) if same_chunk else None
            above = row(pending, -1) if same_chunk else None
            pending = None
        if len(strip) > 5:
            below = strip[5]
            yield strip[:5], above, below
            above = row(strip, -1) if below is not None else None
        else:
            pending = strip
    if pending is not None:
        yield pending, above, None


def _joined(parts: list[dict]) -> dict | None:
    """A chunk's last column over all its rows, from its strips' parts."""
    if not parts:
        return None
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _joined_polygon(parts: list[BaseGeometry]) -> BaseGeometry:
    """The polygon of one region from its pieces in neighbouring strips."""
    # Pixel-corner coordinates are integers and every edge is horizontal or vertical, so the
    # floating-point overlay is exact here (and faster than one snapped to a grid).
    merged = shapely.union_all(parts)
    # Drop the collinear vertices the seams leave behind; exact at tolerance 0, where Douglas-Peucker
    # removes only points lying on their neighbours' segment (half the time of the topology-preserving
    # simplifier, which has nothing to preserve here).
    merged = shapely.simplify(merged, 0.0, preserve_topology=False)
    assert merged.geom_type == "Polygon", "4-connected pixel regions merge into one polygon"
    return merged


def _merged_regions(found, transform: Affine) -> list[RegionPolygon]:
    """One polygon per region: strip regions joined along their seams, mapped to the CRS.

    The joins run in a few threads (GEOS works outside the GIL): in a run they are the last thing
    the polygons wait for, when the engine has finished and the cores are free."""
    pixel_regions, region_classes, counts, sums, maxima, signal_sums, merges = found
    groups: dict[int, list[int]] = {}
    for region in range(len(pixel_regions)):
        groups.setdefault(merges.find(region), []).append(region)

    pieces = [[pixel_regions[m] for m in members] for members in groups.values() if len(members) > 1]
    with ThreadPoolExecutor(max_workers=JOIN_THREADS, thread_name_prefix="farslip-join") as pool:
        joined = iter(list(pool.map(_joined_polygon, pieces)))
    geometries: list[BaseGeometry] = []
    records: list[dict[str, Any]] = []
    for members in groups.values():
        geometries.append(pixel_regions[members[0]] if len(members) == 1 else next(joined))
        totals = signal_sums[members].sum(axis=0)  # margin, entropy, outline: (sum, count) each
        means = [float(totals[k] / totals[k + 1]) if totals[k + 1] else math.nan for k in (0, 2, 4)]
        records.append(
            {
                "class_id": int(region_classes[members[0]]),
                "pixel_count": int(counts[members].sum()),
                "score_sum": float(sums[members].sum()),
                "score_max": float(maxima[members].max()),
                "margin": means[0],
                "entropy": means[1],
                "sharpness": means[2],
            }
        )
    return [
        RegionPolygon(geometry, **record)
        for geometry, record in zip(_to_crs_coordinates(geometries, transform), records)
    ]


def _global_ids(local: np.ndarray, offset: int) -> np.ndarray:
    """Strip region ids (1..n, 0 = none) as indices among all regions so far: offset + id - 1, -1 for none."""
    return np.where(local > 0, local + offset - 1, -1)


def _valid_strip_polygons(strip, skip: set[int]) -> tuple[_Runs, np.ndarray]:
    """A strip's regions and their polygons, each one valid."""
    row_start, col0, classes = strip[:3]
    runs, polygons = _strip_polygons(classes, skip, col0, row_start)
    invalid = ~shapely.is_valid(polygons)
    polygons[invalid] = [_valid_polygon(p) for p in polygons[invalid]]
    return runs, polygons


def _polygonised(in_context: Iterator, skip: set[int], workers: int | None = None) -> Iterator:
    """Each (strip, row above, row below) of `in_context` with its regions and valid polygons, in order.

    A strip's polygons depend on the strip alone and GDAL draws them outside the GIL, so `workers`
    threads (STRIP_THREADS) draw those of the next strips while the caller merges this one's seams:
    on a machine with cores to spare the polygon thread no longer holds the engine back. At most
    `workers` strips beyond the caller's are held."""
    workers = STRIP_THREADS if workers is None else workers
    if workers < 1:
        for item in in_context:
            yield item, _valid_strip_polygons(item[0], skip)
        return
    ahead: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="farslip-strips") as pool:
        try:
            for item in in_context:
                ahead.append((item, pool.submit(_valid_strip_polygons, item[0], skip)))
                if len(ahead) > workers:
                    done, future = ahead.popleft()
                    yield done, future.result()
            while ahead:
                done, future = ahead.popleft()
                yield done, future.result()
        finally:  # the caller stopped (an error, a cancelled run): drop what was not started
            for _, future in ahead:
                future.cancel()


def _strip_regions(strips, skip: set[int], should_cancel, width: int | None = None):
    """Per-strip regions (pixel-space polygons and stats) plus the seam merges between them.

    Strips come column chunk by column chunk; regions meeting across a chunk's vertical seam are
    merged like those across a strip's horizontal one, and the outline of a chunk's last column is
    completed when the next chunk's first column is known.
    """
    pixel_regions: list[BaseGeometry] = []
    region_classes, counts, sums, maxima, signal_sums = [], [], [], [], []
    late_ids, late_values = [], []  # outline pixels on a chunk's last column, known one chunk later
    merges = _UnionFind()
    previous_row_ids = previous_row_classes = None
    chunk = None                    # first column of the chunk being read
    edge_parts: list[dict] = []     # its last column, strip by strip
    edge: dict | None = None        # the previous chunk's last column, all rows

    def merge(ids_a: np.ndarray, classes_a: np.ndarray, ids_b: np.ndarray, classes_b: np.ndarray) -> None:
        """Union the regions on either side of a seam that touch and share a class."""
        touching = (ids_a >= 0) & (ids_b >= 0) & (classes_a == classes_b)
        for a, b in np.unique(np.column_stack([ids_a[touching], ids_b[touching]]), axis=0):
            merges.union(int(a), int(b))

    for ((row_start, col0, classes, scores, signals), above, below), (runs, strip_polygons) in \
            _polygonised(_in_context(strips), skip):
        if should_cancel is not None and should_cancel():
            raise CancelledError("The run was cancelled while writing polygons; nothing was written.")
        if col0 != chunk:
            edge, edge_parts, chunk = (_joined(edge_parts) if chunk is not None else None), [], col0
            previous_row_ids = previous_row_classes = None
        strip_ids, strip_classes, n = runs.region_ids, runs.region_classes, runs.n
        offset = len(pixel_regions)
        height, strip_width = classes.shape
        rows = slice(row_start, row_start + height)
        defer = width is not None and col0 + strip_width < width
        pixel_regions.extend(strip_polygons)
        strip_counts = runs.counts
        region_classes.append(strip_classes)
        counts.append(strip_counts)
        # id 0 ("no region") collects the (often NaN) scores of the other pixels, never used.
        sums.append(runs.sums(scores) if scores is not None else np.full(n, math.nan))
        maxima.append(runs.maxima(scores) if scores is not None else np.full(n, math.nan))
        left = (edge["classes"][rows], edge["score"][rows]) if edge is not None and "score" in edge else None
        outline_sums, outline_counts, pending = _outline_sums(strip_ids, classes, scores, above, below, left,
                                                              defer, n)
        signal_sums.append(np.column_stack([
            *_region_sums(runs, signals[0] if signals is not None else None),
            *_region_sums(runs, signals[1] if signals is not None else None),
            outline_sums, outline_counts,
        ]))

        if edge is not None:  # the seam with the previous chunk, on this strip's rows
            merge(edge["ids"][rows], edge["classes"][rows], _global_ids(strip_ids[:, 0], offset), classes[:, 0])
            if "score" in edge and scores is not None:
                ids, values = _edge_outline(edge, rows, classes[:, 0], scores[:, 0])
                late_ids.append(ids)
                late_values.append(values)
        if defer:
            part = {"ids": _global_ids(strip_ids[:, -1], offset), "classes": classes[:, -1].copy()}
            edge_parts.append({**part, **(pending or {})})
        first_row = _global_ids(strip_ids[0], offset)
        if previous_row_ids is not None and previous_row_classes is not None:
            merge(previous_row_ids, previous_row_classes, first_row, classes[0])
        previous_row_ids = _global_ids(strip_ids[-1], offset)
        previous_row_classes = classes[-1].copy()  # the strip's arrays may be reused once it is done with

    def stacked(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    signals_total = np.concatenate(signal_sums) if signal_sums else np.zeros((0, 6))
    if late_ids:
        ids = np.concatenate(late_ids)
        np.add.at(signals_total[:, 4], ids, np.concatenate(late_values).astype(np.float64))
        np.add.at(signals_total[:, 5], ids, 1.0)
    return (
        pixel_regions,
        stacked(region_classes, np.int64),
        stacked(counts, np.int64),
        stacked(sums, np.float64),
        stacked(maxima, np.float64),
        signals_total,
        merges,
    )


def polygon_areas_m2(geometries: Sequence[BaseGeometry], crs) -> np.ndarray:
    """Ground areas in square metres: geodesic in a geographic CRS; in a projected one planar (scaled by
    its unit), or ellipsoidal where the projection is more than 1 % off the ground areas at the polygon's
    centroid (Web Mercator away from the equator: see ground.py).

    Without a CRS the planar area is returned as is (map units taken as metres).
    """
    shapes = np.asarray(geometries, dtype=object)
    crs = as_pyproj(crs)
    if crs is None or not crs.is_geographic:
        metres_per_unit = crs.axis_info[0].unit_conversion_factor if crs is not None else 1.0
        planar = shapely.area(shapes) * metres_per_unit**2
        if crs is None or len(shapes) == 0:
            return planar
        xmin, ymin, xmax, ymax = shapely.total_bounds(shapes)
        corners = ([xmin, xmin, xmax, xmax, (xmin + xmax) / 2], [ymin, ymax, ymin, ymax, (ymin + ymax) / 2])
        if keeps_areas(crs, *corners, tolerance=TRUE_SCALE_TOLERANCE / 2).all():
            return planar  # UTM, national grids: true to well within the tolerance over all these shapes
        centres = shapely.centroid(shapes)  # an empty shape's is empty: NaN, kept planar
        distorted = ~keeps_areas(crs, shapely.get_x(centres), shapely.get_y(centres))
        if distorted.any():
            ground = geodesic_areas(shapes[distorted], crs)
            if ground is not None:  # a polygon reaching where the projection has no inverse keeps its planar area
                planar[distorted] = np.where(np.isfinite(ground), ground, planar[distorted])
        return planar
    geod = crs.get_geod()
    assert geod is not None, "a geographic CRS has an ellipsoid"
    degrees_per_unit = math.degrees(crs.axis_info[0].unit_conversion_factor)
    if degrees_per_unit != 1.0:
        shapes = shapely.transform(shapes, lambda xy: xy * degrees_per_unit)
    return ellipsoid_areas(shapes, geod)


def _straight_frame_edges(polygon, bounds: tuple[float, float, float, float]):
    """`polygon` (pixel coordinates) without the vertices that only mark pixel corners along the frame
    `bounds`: those between two neighbours on the same side of the frame (simplify_boundary=False keeps
    every vertex there, one per pixel after segmentize). Where two polygons meet on the frame, the ring
    turns away from it, so the shared corner stays."""
    if polygon.geom_type != "Polygon" or polygon.is_empty:
        return polygon
    ring = np.asarray(polygon.exterior.coords)[:-1]
    x, y = ring[:, 0], ring[:, 1]
    on_side = np.zeros(len(ring), bool)
    for values, edge in ((x, bounds[0]), (x, bounds[2]), (y, bounds[1]), (y, bounds[3])):
        here = values == edge
        on_side |= here & np.roll(here, 1) & np.roll(here, -1)
    if not on_side.any() or on_side.all():
        return polygon
    kept = ring[~on_side]
    return shapely.Polygon(kept, [interior.coords for interior in polygon.interiors])


def simplify_coverage(geometries: Sequence[BaseGeometry], tolerance: float, transform: Affine) -> list:
    """Simplify polygons together so neighbours keep sharing their edges (no gaps or overlaps).

    `tolerance` is in CRS units. The work happens on the pixel grid, where the polygons of one raster
    form an exact coverage once every edge carries a vertex at each pixel corner; the rectangle around
    them (the raster's edge) is kept. A polygon that would come out invalid or empty is kept unsimplified.
    """
    if tolerance <= 0 or len(geometries) == 0:
        return list(geometries)
    to_pixels = ~transform
    pa, pb, pc, pd, pe, pf = to_pixels.a, to_pixels.b, to_pixels.c, to_pixels.d, to_pixels.e, to_pixels.f

    def apply_inverse(xy: np.ndarray) -> np.ndarray:
        return np.rint(
            np.column_stack([pa * xy[:, 0] + pb * xy[:, 1] + pc, pd * xy[:, 0] + pe * xy[:, 1] + pf])
        )

    pixel_size = math.sqrt(abs(transform.determinant))
    originals = np.asarray(geometries, dtype=object)
    on_grid = shapely.segmentize(shapely.transform(originals, apply_inverse), 1.0)
    # The edge of the raster stays where it is (a large tolerance cut triangles off its corners, which then
    # had no polygon): stand-ins fill the gaps (unclassified, nodata) inside the rectangle around the
    # polygons, so that rectangle is the coverage's outer boundary, which simplify_boundary=False keeps;
    # the edges beside the gaps are inner edges, simplified as before.
    frame = shapely.box(*shapely.total_bounds(on_grid))
    gaps = shapely.get_parts(shapely.difference(frame, shapely.coverage_union_all(on_grid)))
    gaps = shapely.segmentize(gaps[~shapely.is_empty(gaps)], 1.0)
    simplified = shapely.coverage_simplify(np.concatenate([on_grid, gaps]), tolerance / pixel_size,
                                           simplify_boundary=False)[:len(on_grid)]
    simplified = np.array([_straight_frame_edges(g, frame.bounds) for g in simplified], dtype=object)
    simplified = np.asarray(_to_crs_coordinates(list(simplified), transform), dtype=object)
    unusable = ~shapely.is_valid(simplified) | shapely.is_empty(simplified)
    simplified[unusable] = originals[unusable]
    return list(simplified)


def finalize(
    regions: Sequence[RegionPolygon],
    crs,
    transform: Affine,
    min_area_m2: float = 0.0,
    simplify: float = 0.0,
) -> list[RegionPolygon]:
    """Simplified regions (tolerance `simplify` in CRS units) with area_m2, smaller than `min_area_m2` dropped.

    `crs` is the class raster's CRS (rasterio CRS, pyproj CRS, WKT or "EPSG:n"), `transform` its
    affine transform.
    """
    if not regions:
        return []
    geometries = simplify_coverage([r.geometry for r in regions], simplify, transform)
    areas = polygon_areas_m2(geometries, crs)
    return [
        replace(region, geometry=geometry, area_m2=float(area))
        for region, geometry, area in zip(regions, geometries, areas)
        if not area < min_area_m2  # an area that cannot be measured (NaN) never drops a region unsaid
    ]
