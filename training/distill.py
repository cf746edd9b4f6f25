"""Views for FarSLIP's local-to-global patch distillation (FARSLIP_METHOD.md section 6, stage 1).

The student sees a *global view*: a square of the training area read from the raster at its native
resolution and resized to the model input, so it is at least 2x coarser than the native pixels when
the training area is large enough. Inside it, boxes are drawn as torchvision's
`RandomResizedCrop.get_params` draws them (area 0.3-0.7 of the view, log-uniform aspect 3/4-4/3).
The teacher's *local view* of a box is the same box cut from the native-resolution read and resized
to the model input: it carries the finer detail that distillation transfers to the global map.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from backend.engine.raster import PixelWindow, RasterSource

BOX_AREA = (0.3, 0.7)
BOX_ASPECT = (3 / 4, 4 / 3)
DETAIL = 2.0  # native pixels per global-view pixel the views aim for


@dataclass
class DistillViews:
    global_pixels: torch.Tensor  # (B, 3, S, S) 0..255: the student's global views
    boxes: torch.Tensor          # (B*K, 5) rows (view index, x0, y0, x1, y1) in global-view pixels
    local_pixels: torch.Tensor   # (B*K, 3, S, S) 0..255: the teacher's views, cut from native pixels
    native_px: int               # side of the global view in native raster pixels
    detail: float                # native pixels per global-view pixel (native_px / S)
    origins: list[tuple[int, int]]  # (row, col) of each global view in native raster pixels


def draw_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one box in a height x width view, by `RandomResizedCrop.get_params`
    (area 0.3-0.7, aspect 3/4-4/3), its torch generator seeded from `rng` so runs are repeatable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**62)))
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(0, height, width), scale=BOX_AREA,
                                                       ratio=BOX_ASPECT)
    return int(top), int(left), int(h), int(w)


def native_source(source: RasterSource) -> RasterSource:
    """The same open raster, bands and value scaling, read at its native resolution."""
    if source.scales == (1.0, 1.0):
        return source
    return dataclasses.replace(source, scale=1.0, scale_y=None)


def native_area(source: RasterSource, window: PixelWindow) -> PixelWindow:
    """The native pixels inside a processing-grid window (rounded inwards)."""
    fy, fx = source.dataset.height / source.height, source.dataset.width / source.width
    row0, col0 = math.ceil(window.row_off * fy - 1e-6), math.ceil(window.col_off * fx - 1e-6)
    row1 = math.floor((window.row_off + window.height) * fy + 1e-6)
    col1 = math.floor((window.col_off + window.width) * fx + 1e-6)
    return PixelWindow(row0, col0, row1 - row0, col1 - col0)


def view_side(area: PixelWindow, input_px: int) -> int:
    """Native side of a global view: DETAIL x the input size, or the largest the area holds."""
    return max(1, min(round(DETAIL * input_px), area.height, area.width))


def resize_square(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased when shrinking (as PIL resizes in the release's transforms), 0..255."""
    resized = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 255.0)


def sample_views(source: RasterSource, area: PixelWindow, input_px: int, views: int, boxes_per_view: int,
                 rng: np.random.Generator) -> DistillViews:
    """`views` global views inside `area` (native pixels of `source`) with their boxes and local views."""
    side = view_side(area, input_px)
    scale = input_px / side
    global_views, local_views, rows, origins = [], [], [], []
    for index in range(views):
        row = area.row_off + int(rng.integers(0, area.height - side + 1))
        col = area.col_off + int(rng.integers(0, area.width - side + 1))
        origins.append((row, col))
        rgb, _valid = source.read(PixelWindow(row, col, side, side))
        native = torch.from_numpy(rgb)[None]
        global_views.append(resize_square(native, input_px))
        for _ in range(boxes_per_view):
            top, left, h, w = draw_box(side, side, rng)
            local_views.append(resize_square(native[:, :, top:top + h, left:left + w], input_px))
            rows.append((index, left * scale, top * scale, (left + w) * scale, (top + h) * scale))
    return DistillViews(torch.cat(global_views), torch.tensor(rows, dtype=torch.float32), torch.cat(local_views),
                        side, side / input_px, origins)
