"""Edge-aware refinement of class probabilities with the image itself (`--refine edges`).

FarSLIP's logits live on a 16-px patch grid and are bilinearly upsampled, so class boundaries are
smooth blobs that ignore the roof edge or field border under them. Here every class gets a local
colour model (probability-weighted mean and variance of the image in a box around each pixel) and
the coarse probability is used as the prior of a per-pixel Bayes decision: where the patch grid
hesitates, the pixel's own colour decides, so boundaries snap to image edges; where it is sure,
nothing changes. No weights, five box sums per class (integral images: O(1) per pixel whatever the
radius), and a pixel's result only depends on pixels within `halo_px()`: reading that halo makes
the result independent of the requested extent.

Chosen by measurement (`farslip bench --refine`, docs/refine.md): a guided filter and pixel-adaptive
refinement (PAMR-style iterated affinities) were tried first; both smooth the probabilities, which
shrinks objects narrower than a few patches and lowered mIoU and boundary F on the solaris scene
at every setting tried, while the local colour model raised both on every scene.

Nodata: masked pixels carry no weight in any box sum, so what lies under a mask never moves a
boundary, and masked pixels stay masked (NaN probabilities, the nodata class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from .errors import CancelledError
from .raster import PixelWindow



@dataclass(frozen=True)
class EdgeSettings:
    """Refinement settings, in processing pixels and 0..1 image units."""

    radius: int = 8        # half a 16-px patch: the largest boundary error the patch grid makes
    noise: float = 0.03    # colour noise floor (0..1 units): keeps flat regions from overconfident models
    guide: str = "grey"    # "grey" (luminance) or "colour" (each band modelled, their mean counted)


DEFAULT_EDGES = EdgeSettings()


def halo_px(settings: EdgeSettings = DEFAULT_EDGES) -> int:
    """Pixels beyond a block that can change the block's refined result."""
    return settings.radius


def box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum over the (2r+1)^2 box around each pixel of the last two axes, clipped at the array's edge."""
    height, width = values.shape[-2:]
    out = np.cumsum(values, axis=-2, dtype=np.float64)
    out = np.concatenate([np.zeros_like(out[..., :1, :]), out], axis=-2)
    top = np.clip(np.arange(height) - radius, 0, height)
    bottom = np.clip(np.arange(height) + radius + 1, 0, height)
    out = out[..., bottom, :] - out[..., top, :]
    out = np.cumsum(out, axis=-1)
    out = np.concatenate([np.zeros_like(out[..., :1]), out], axis=-1)
    left = np.clip(np.arange(width) - radius, 0, width)
    right = np.clip(np.arange(width) + radius + 1, 0, width)
    return out[..., right] - out[..., left]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(3, h, w) 0..255 -> (h, w) 0..1 brightness (Rec. 601 weights)."""
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


def refine_edges(probs: np.ndarray, rgb: np.ndarray, valid: np.ndarray,
                 settings: EdgeSettings = DEFAULT_EDGES) -> np.ndarray:
    """(C, h, w) class probabilities + (3, h, w) RGB 0..255 + (h, w) validity -> refined (C, h, w).

    Each class gets a local colour model: the mean and variance of the image in the (2r+1)^2 box
    around the pixel, every valid pixel weighted by its probability of that class. The refined
    probability is the coarse one (the prior) times the likelihood of the pixel's colour under that
    model, normalised over the classes. Inside a region the prior is ~1 or ~0 and nothing changes;
    in the band where the upsampled patch grid hesitates, the colour decides, so the boundary snaps
    to where the image changes. Invalid pixels are NaN. Exact inside the block; pixels within
    `halo_px(settings)` of a block edge that is not the raster's edge need that halo around them.
    """
    valid = valid & np.isfinite(probs).all(axis=0)
    prior = np.where(valid[None], probs, 0.0).astype(np.float64)
    guide = (rgb / 255.0) if settings.guide == "colour" else luminance(rgb)[None]
    guide = np.where(valid[None], guide, 0.0).astype(np.float64)
    weight_sum = box_sum(prior, settings.radius) + 1e-9
    log_post = np.log(np.clip(prior, 1e-6, 1.0))
    for c in range(len(prior)):
        mean = box_sum(prior[c] * guide, settings.radius) / weight_sum[c]
        var = box_sum(prior[c] * guide * guide, settings.radius) / weight_sum[c] - mean * mean
        var = np.maximum(var, 0.0) + settings.noise ** 2
        # Mean over channels, not sum: a grey raster read as three equal bands must not count thrice.
        log_post[c] += (-0.5 * (guide - mean) ** 2 / var - 0.5 * np.log(var)).mean(axis=0)
    log_post -= log_post.max(axis=0, keepdims=True)
    out = np.exp(log_post)
    out /= out.sum(axis=0, keepdims=True)
    out = out.astype(np.float32)
    out[:, ~valid] = np.nan
    return out


def grow_window(window: PixelWindow, margin: int, height: int, width: int) -> PixelWindow:
    """`window` widened by `margin` pixels on every side, clipped to a height x width raster."""
    row0, col0 = max(0, window.row_off - margin), max(0, window.col_off - margin)
    row1 = min(height, window.row_off + window.height + margin)
    col1 = min(width, window.col_off + window.width + margin)
    return PixelWindow(row0, col0, row1 - row0, col1 - col0)


def window_blocks(window: PixelWindow, side: int) -> list[PixelWindow]:
    """`window` cut into side x side blocks (smaller at its right and bottom edges), row by row."""
    bottom, right = window.row_off + window.height, window.col_off + window.width
    return [PixelWindow(r, c, min(side, bottom - r), min(side, right - c))
            for r in range(window.row_off, window.row_off + window.height, side)
            for c in range(window.col_off, window.col_off + window.width, side)]


REFINE_BLOCK = 512


def refine_edges_blocks(source, window: PixelWindow, computed: PixelWindow, prob_path,
                        settings: EdgeSettings = DEFAULT_EDGES, should_cancel=None):
    """Yield (block, refined probs, coarse probs, valid) for `window`, block by block, in bounded memory.

    `prob_path` holds the engine's class probabilities of `computed` (processing grid, NaN where
    invalid), which must cover `window` plus `halo_px(settings)` wherever the raster goes on.
    """
    halo = halo_px(settings)
    with rasterio.open(prob_path) as probs_ds:
        for block in window_blocks(window, REFINE_BLOCK):
            if should_cancel is not None and should_cancel():
                raise CancelledError("The run was cancelled; nothing was written.")
            around = grow_window(block, halo, source.height, source.width)
            assert (around.row_off >= computed.row_off and around.col_off >= computed.col_off
                    and around.row_off + around.height <= computed.row_off + computed.height
                    and around.col_off + around.width <= computed.col_off + computed.width), "halo computed"
            probs = probs_ds.read(window=Window(around.col_off - computed.col_off, around.row_off - computed.row_off,
                                                around.width, around.height))
            rgb, valid = source.read(around)
            refined = refine_edges(probs, rgb, valid, settings)
            inner = (slice(block.row_off - around.row_off, block.row_off - around.row_off + block.height),
                     slice(block.col_off - around.col_off, block.col_off - around.col_off + block.width))
            yield block, refined[:, inner[0], inner[1]], probs[:, inner[0], inner[1]], np.isfinite(refined[0][inner])
