"""Spatial train/validation split and samplers of boxes in map coordinates.

The validation part is a strip along one edge of the labelled window. The
training part is the rectangle left after removing the strip and a buffer
beside it, so no training crop or region box can contain a validation pixel
(no leakage across the split), and spatially autocorrelated pixels next to
the border are not used at all. Samplers work in the label grid's pixels
(a rotated geotransform's map envelopes would cover other pixels, the
validation strip's among them): they yield boxes of fractional pixel
coordinates inside the training PixelBox; `grid_box_on` carries one onto
another grid of the raster (the native one) through the map coordinates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import shapely
import shapely.affinity
from rasterio.transform import Affine

from .labels import LabelGrid

Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in the raster's CRS
GridBox = tuple[float, float, float, float]  # col0, row0, col1, row1 in label-grid pixels (fractional)
EDGES = ("right", "bottom", "left", "top")


@dataclass(frozen=True)
class PixelBox:
    """Rows [row0, row1) and columns [col0, col1) of the label grid."""

    row0: int
    col0: int
    row1: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row0, self.row1), slice(self.col0, self.col1)


@dataclass
class SpatialSplit:
    """Where the validation strip, the buffer and the training rectangle lie."""

    edge: str
    train: PixelBox
    validation: PixelBox
    buffer_px: int
    train_bounds: Box
    validation_bounds: Box
    train_pixels: dict[str, int]
    validation_pixels: dict[str, int]

    def to_json(self) -> dict:
        data = asdict(self)
        data["train"] = asdict(self.train)
        data["validation"] = asdict(self.validation)
        return data


def pixel_sizes(transform: Affine) -> tuple[float, float]:
    """A pixel's true width and height in map units: the lengths of the affine's column and row vectors
    (abs(a) is 0 on a grid rotated by 90 degrees)."""
    return math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)


def box_bounds(box: PixelBox, transform: Affine) -> Box:
    """The map envelope of a pixel box: all four corners (two opposite ones miss a rotated box's extent)."""
    xs, ys = zip(*(transform @ (col, row) for col in (box.col0, box.col1) for row in (box.row0, box.row1)))
    return (min(xs), min(ys), max(xs), max(ys))


def grid_box_on(box: GridBox, transform: Affine, target: Affine) -> PixelBox:
    """A label-grid box (pixels of `transform`) -> the pixels of the grid `target` it covers, rounded to the
    nearest edges; exact for grids that differ by scale and offset (the native and processing grids)."""
    inverse = ~target
    cols, rows = zip(*(inverse @ (transform @ (col, row)) for col in (box[0], box[2]) for row in (box[1], box[3])))
    return PixelBox(round(min(rows)), round(min(cols)), round(max(rows)), round(max(cols)))


def rounded(box: GridBox) -> PixelBox:
    return PixelBox(round(box[1]), round(box[0]), round(box[3]), round(box[2]))


def to_pixels(bounds: Box, transform: Affine) -> PixelBox:
    """Map-coordinate box -> the label-grid pixels it covers (rounded to the nearest edges)."""
    inverse = ~transform
    cols, rows = zip(*(inverse @ (x, y) for x in (bounds[0], bounds[2]) for y in (bounds[1], bounds[3])))
    return PixelBox(round(min(rows)), round(min(cols)), round(max(rows)), round(max(cols)))


def _strips(height: int, width: int, edge: str, size: int, buffer_px: int) -> tuple[PixelBox, PixelBox]:
    """(validation strip, training rectangle) for a strip of `size` pixels along `edge`."""
    if edge == "right":
        return (PixelBox(0, width - size, height, width), PixelBox(0, 0, height, width - size - buffer_px))
    if edge == "left":
        return (PixelBox(0, 0, height, size), PixelBox(0, size + buffer_px, height, width))
    if edge == "bottom":
        return (PixelBox(height - size, 0, height, width), PixelBox(0, 0, height - size - buffer_px, width))
    return (PixelBox(0, 0, size, width), PixelBox(size + buffer_px, 0, height, width))


def _counts(labels: np.ndarray, box: PixelBox, classes: int) -> np.ndarray:
    part = labels[box.slices]
    return np.bincount(part[part >= 0].ravel(), minlength=classes)


def split_labels(grid: LabelGrid, transform: Affine, validation_fraction: float = 0.2,
                 buffer_px: int = 32, min_train_side: int = 64) -> SpatialSplit:
    """Choose the edge strip holding about `validation_fraction` of the labelled pixels.

    Among the four edges, prefer the split where validation and training both see
    the most classes, then the one whose fraction is closest to the target.
    """
    from backend.engine.errors import InputError

    labels = grid.labels
    height, width = labels.shape
    classes = len(grid.class_lines)
    total = max(int((labels >= 0).sum()), 1)
    best, best_key = None, None
    for edge in EDGES:
        along = width if edge in ("left", "right") else height
        profile = (labels >= 0).sum(axis=0 if edge in ("left", "right") else 1)
        if edge in ("right", "bottom"):
            profile = profile[::-1]
        cumulative = np.cumsum(profile) / total
        size = int(np.searchsorted(cumulative, validation_fraction) + 1)
        size = max(size, 1)
        if along - size - buffer_px < min_train_side:
            continue
        validation, train = _strips(height, width, edge, size, buffer_px)
        val_counts, train_counts = _counts(labels, validation, classes), _counts(labels, train, classes)
        key = (int(min((val_counts > 0).sum(), (train_counts > 0).sum())), int((val_counts > 0).sum()),
               -abs(val_counts.sum() / total - validation_fraction))
        if best_key is None or key > best_key:
            best, best_key = (edge, validation, train, val_counts, train_counts), key
    if best is None:
        raise InputError(f"The labelled area ({width} x {height} pixels) is too small to hold out a "
                         f"validation strip and still train: label an area at least "
                         f"{min_train_side + buffer_px + 16} pixels wide.")
    edge, validation, train, val_counts, train_counts = best
    if (train_counts > 0).sum() < 2 or val_counts.sum() == 0:
        raise InputError("The labelled classes are not spread out enough to hold out a validation strip: "
                         "after the split the training part has fewer than two classes or the validation "
                         "part has no labelled pixels. Label more areas across the raster.")
    return SpatialSplit(edge, train, validation, buffer_px, box_bounds(train, transform),
                        box_bounds(validation, transform),
                        {c: int(n) for c, n in zip(grid.class_lines, train_counts)},
                        {c: int(n) for c, n in zip(grid.class_lines, val_counts)})


def random_crop_boxes(area: PixelBox, side_px: float, count: int, rng: np.random.Generator) -> list[GridBox]:
    """`count` square boxes of `side_px` label-grid pixels lying wholly inside `area`."""
    cols = rng.uniform(area.col0, max(area.col0, area.col1 - side_px), count)
    rows = rng.uniform(area.row0, max(area.row0, area.row1 - side_px), count)
    return [(c, r, c + side_px, r + side_px) for c, r in zip(cols, rows)]


def region_boxes(grid: LabelGrid, area: PixelBox, transform: Affine, native_per_pixel: tuple[float, float] = (1, 1),
                 min_size_px: float = 64, max_size_px: float = 1024) -> tuple[list[GridBox], list[int]]:
    """Boxes (label-grid pixels) of the labelled regions inside `area`, with each one's class id.

    A polygon is taken to the label grid's pixels (`transform`) and clipped to `area`; each of its parts (the
    polygons of a MultiPolygon, as a layer dissolved by class holds them; the pieces clipping leaves) is one
    region, whose box is kept when sqrt(box area) lies in [min_size_px, max_size_px] native raster pixels
    (`native_per_pixel`: native pixels per label-grid pixel across and down), FarSLIP's rule for
    region-category alignment. Classes left without boxes get `pure_boxes` instead.
    """
    inverse = ~transform
    frame = shapely.box(area.col0, area.row0, area.col1, area.row1)
    boxes, class_ids = [], []
    for geometry, class_id in zip(grid.polygons.geometries, grid.class_of_polygon):
        if geometry is None or geometry.is_empty:
            continue
        in_pixels = shapely.affinity.affine_transform(geometry, [inverse.a, inverse.b, inverse.d, inverse.e,
                                                                 inverse.c, inverse.f])
        for part in shapely.get_parts(shapely.intersection(in_pixels, frame)):
            if part.is_empty or part.area <= 0:  # a clipped edge or corner: no region
                continue
            c0, r0, c1, r1 = part.bounds
            size_px = math.sqrt((c1 - c0) * native_per_pixel[0] * (r1 - r0) * native_per_pixel[1])
            if min_size_px <= size_px <= max_size_px:
                boxes.append((c0, r0, c1, r1))
                class_ids.append(int(class_id))
    return boxes, class_ids


def pure_boxes(grid: LabelGrid, area: PixelBox, class_id: int, side_px: float, count: int,
               rng: np.random.Generator, min_fraction: float = 0.8, tries: int = 20) -> list[GridBox]:
    """Random square boxes of `side_px` label-grid pixels inside `area` mostly covered by one class (for
    classes without region boxes of their polygons, such as the background); none when `area` is narrower."""
    if side_px > min(area.height, area.width):
        return []
    boxes = []
    for box in random_crop_boxes(area, side_px, count * tries, rng):
        part = grid.labels[rounded(box).slices]
        if part.size and (part == class_id).mean() >= min_fraction:
            boxes.append(box)
            if len(boxes) == count:
                break
    return boxes


def steps_for(area_px: int, crop_px: int, batch_size: int, low: int = 20, high: int = 200) -> int:
    """Steps per epoch: enough crops to cover the training area about twice, at least `low`."""
    return int(np.clip(math.ceil(2 * area_px / (crop_px * crop_px) / batch_size), low, high))
