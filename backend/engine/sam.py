"""`--refine sam`: Segment Anything draws the outlines, the CLIP class map says what they are.

RSRefSeg 2's split (FARSLIP_METHOD.md section 7): the coarse class map from the patch grid says
what and roughly where; SAM, prompted by it, draws the boundary.

- Windows: SAM sees square windows of its own input size (1024 px) on a grid anchored to the
  raster, overlapping by a quarter. Each window's image embedding is computed once and reused for
  every prompt in it. Each pixel belongs to exactly one window's core (the overlaps are split in
  the middle), so every pixel is decided once.
- Prompts: every connected region of a class that reaches a window's core gives one prompt: its
  bounding box, positive points at the class-probability maximum and at the region's most
  interior pixel, negative points at the probability maxima of the other classes around it.
- Fusion (SAM decides the boundary where the class map hesitates, CLIP decides the class): a SAM
  mask is kept when its IoU with the region it was prompted by is at least `min_agreement`;
  otherwise it is dropped and the region keeps its coarse outline. SAM may give a pixel a class
  only if that class's probability is at least the request's threshold and within `margin` of the
  pixel's most probable class (`plausible`): a kept mask gives such pixels the region's class; the
  region's pixels outside the mask take their next most probable class if it is plausible, else
  keep the region's class. So a confident pixel never changes class, an unclassified pixel stays
  unclassified, and the refined map obeys the threshold. Where kept masks overlap, the smaller one
  wins (objects over the ground around them).
- The result is a refined class raster on the request's grid, written window by window, whose
  regions are then vectorised as usual: an object cut by a window border is one region in the
  raster, so it comes out as one polygon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from scipy import ndimage

from .errors import CancelledError
from .raster import PixelWindow
from .sliding import NODATA_CLASS, UNCLASSIFIED, crop_starts

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
PAD_LABEL = -10            # transformers' SAM ignores points with this label (pads a prompt's point list)
PROMPTS_PER_BATCH = 32
MIN_REGION_PX = 16         # smaller regions are patch-grid noise, not objects worth a prompt
COARSE_GSD_WARNING_M = 10.0


@dataclass(frozen=True)
class SamSettings:
    min_agreement: float = 0.5   # IoU of SAM mask vs prompting region below which the SAM mask is dropped
    margin: float = 0.2          # how far below the most probable class a class SAM gives a pixel may be
    overlap: float = 0.25        # share of the window side shared with the next window


@dataclass
class SamStats:
    windows: int = 0
    prompts: int = 0
    kept: int = 0
    dropped: int = 0
    embed_s: float = 0.0
    decode_s: float = 0.0
    sam_score_sum: float = 0.0
    per_window: list = field(default_factory=list)

    def summary(self) -> dict:
        return {"windows": self.windows, "prompts": self.prompts, "kept": self.kept, "dropped": self.dropped,
                "embed_s_per_window": self.embed_s / self.windows if self.windows else None,
                "decode_s_per_object": self.decode_s / self.prompts if self.prompts else None,
                "mean_sam_score": self.sam_score_sum / self.prompts if self.prompts else None}


def window_cores(length: int, side: int, stride: int) -> list[tuple[int, int, int]]:
    """(window start, core start, core end) along one axis: cores split the overlaps in the middle."""
    starts = crop_starts(length, side, stride)
    ends = [min(s + side, length) for s in starts]
    bounds = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(len(starts) - 1)] + [length]
    return [(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def coarse_resolution_warning(gsd_m: float, window_px: int = 1024) -> str | None:
    """Why SAM outlines are not to be trusted on pixels coarser than ~10 m (None when they are fine)."""
    if gsd_m <= COARSE_GSD_WARNING_M:
        return None
    return (f"The raster's pixels are {gsd_m:.1f} m wide: a SAM window of {window_px} px then spans "
            f"{gsd_m * window_px / 1000:.0f} km and single objects are a few pixels, far from the photos SAM was "
            f"trained on; SAM outlines at resolutions coarser than {COARSE_GSD_WARNING_M:g} m are "
            "unreliable (use --refine edges).")


# --------------------------------------------------------------------------- prompts and fusion


@dataclass
class Prompt:
    class_id: int
    region: np.ndarray            # (h, w) bool: the coarse region (window grid)
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in window pixels
    points: list[tuple[float, float]]
    labels: list[int]             # 1 positive, 0 negative


def region_prompts(classes: np.ndarray, probs: np.ndarray, core: np.ndarray) -> list[Prompt]:
    """One prompt per connected class region (4-connected) that reaches `core`."""
    prompts = []
    for class_id in np.unique(classes):
        if class_id in (NODATA_CLASS, UNCLASSIFIED):
            continue
        labels, _ = ndimage.label(classes == class_id)
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            region = labels == index
            if region.sum() < MIN_REGION_PX or not (region & core).any():
                continue
            ys, xs = found
            box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
            own = np.where(region, probs[class_id], -1.0)
            peak = np.unravel_index(np.argmax(own), own.shape)
            inside = ndimage.distance_transform_edt(region)
            centre = np.unravel_index(np.argmax(inside), inside.shape)
            points: list[tuple[float, float]] = [(peak[1] + 0.5, peak[0] + 0.5), (centre[1] + 0.5, centre[0] + 0.5)]
            point_labels = [1, 1]
            # Negatives: where each other class is most sure, in a margin around the box.
            margin = max(8, (ys.stop - ys.start + xs.stop - xs.start) // 4)
            around = (slice(max(0, ys.start - margin), ys.stop + margin),
                      slice(max(0, xs.start - margin), xs.stop + margin))
            for other in range(len(probs)):
                if other == class_id:
                    continue
                theirs = np.where(~region[around], np.nan_to_num(probs[other][around], nan=-1.0), -1.0)
                best = np.unravel_index(np.argmax(theirs), theirs.shape)
                if theirs[best] > 0.5:
                    points.append((best[1] + around[1].start + 0.5, best[0] + around[0].start + 0.5))
                    point_labels.append(0)
            prompts.append(Prompt(int(class_id), region, box, points, point_labels))
    return prompts


def mask_agreement(mask: np.ndarray, region: np.ndarray) -> float:
    """IoU of a SAM mask and the class region that prompted it."""
    union = np.logical_or(mask, region).sum()
    return float(np.logical_and(mask, region).sum() / union) if union else 0.0


def plausible(probs: np.ndarray, class_ids: np.ndarray, margin: float, threshold: float) -> np.ndarray:
    """Where the class map could be that class: at least `threshold` and within `margin` of the top class.

    `probs` (C, n) and `class_ids` (n,) are the probabilities and candidate classes of n pixels.
    """
    probs = np.nan_to_num(probs, nan=0.0)
    own = np.take_along_axis(probs, class_ids[None].astype(np.intp), 0)[0]
    return (own >= threshold) & (own >= probs.max(axis=0) - margin)


def fuse(classes: np.ndarray, probs: np.ndarray, valid: np.ndarray, prompts: list[Prompt], masks: list[np.ndarray],
         min_agreement: float, margin: float = SamSettings.margin,
         threshold: float = 0.0) -> tuple[np.ndarray, list[bool]]:
    """The refined class map of a window (see the module docstring) and which masks were kept."""
    refined = classes.copy()
    kept = [mask_agreement(mask & valid, prompt.region) >= min_agreement for prompt, mask in zip(prompts, masks)]
    claimed = np.zeros(classes.shape, bool)
    # Largest first, so smaller masks paint over larger ones: objects over the ground around them.
    order = sorted((i for i in range(len(prompts)) if kept[i]), key=lambda i: -int(masks[i].sum()))
    for i in order:
        prompt, mask = prompts[i], masks[i] & valid
        lost = prompt.region & valid & ~mask & ~claimed
        if lost.any() and len(probs) > 1:
            others = np.nan_to_num(probs[:, lost], nan=0.0)
            others[prompt.class_id] = -1.0
            runner_up = others.argmax(axis=0)
            refined[lost] = np.where(plausible(probs[:, lost], runner_up, margin, threshold), runner_up,
                                     prompt.class_id)
        ours = np.full(int(mask.sum()), prompt.class_id)
        taken = mask.copy()
        taken[mask] = plausible(probs[:, mask], ours, margin, threshold)
        refined[taken] = prompt.class_id
        claimed |= taken
    return refined, kept


# --------------------------------------------------------------------------- SAM calls


def _pixels(rgb: np.ndarray, side: int, device: torch.device) -> torch.Tensor:
    """(3, h, w) 0..255 -> SAM's normalised (1, 3, side, side), zero-padded at the bottom and right."""
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    pixels = (torch.from_numpy(rgb) - mean) / std
    pixels = F.pad(pixels, (0, side - rgb.shape[2], 0, side - rgb.shape[1]))
    return pixels[None].to(device)


@torch.inference_mode()
def predict_masks(sam, embedding: torch.Tensor, prompts: list[Prompt], shape: tuple[int, int]):
    """SAM masks (window grid, bool) and predicted IoU scores for `prompts`, batched, one embedding."""
    masks: list[np.ndarray] = []
    scores: list[float] = []
    for first in range(0, len(prompts), PROMPTS_PER_BATCH):
        batch = prompts[first:first + PROMPTS_PER_BATCH]
        width = max(len(p.points) for p in batch)
        points = torch.zeros((1, len(batch), width, 2))
        labels = torch.full((1, len(batch), width), PAD_LABEL, dtype=torch.long)
        for i, prompt in enumerate(batch):
            points[0, i, :len(prompt.points)] = torch.tensor(prompt.points)
            labels[0, i, :len(prompt.labels)] = torch.tensor(prompt.labels)
        boxes = torch.tensor([[p.box for p in batch]], dtype=torch.float32)
        out = sam.model(image_embeddings=embedding, input_points=points.to(sam.device),
                        input_labels=labels.to(sam.device), input_boxes=boxes.to(sam.device),
                        multimask_output=False)
        low_res = out.pred_masks[0, :, 0]                                   # (n, 256, 256) logits
        full = F.interpolate(low_res[:, None], size=(sam.image_size, sam.image_size), mode="bilinear",
                             align_corners=False)[:, 0, :shape[0], :shape[1]]
        masks.extend((full > 0).cpu().numpy())
        scores.extend(out.iou_scores[0, :, 0].float().cpu().tolist())
    return masks, scores


def refine_with_sam(sam, source, window: PixelWindow, class_path, prob_path, refined_path,
                    settings: SamSettings = SamSettings(), progress=None, should_cancel=None,
                    mask_predictor=None, threshold: float = 0.0) -> SamStats:
    """Write `refined_path` (a copy of `class_path`, the request window's coarse classes) refined by SAM.

    `prob_path` holds the class probabilities on the same grid (read, never changed); `threshold` is the
    request's: no pixel gets a class whose probability is below it. Memory: one SAM window at a time.
    `mask_predictor(sam, embedding, prompts, shape) -> (masks, scores)` defaults to `predict_masks`.
    """
    side = sam.image_size
    stride = max(1, int(side * (1 - settings.overlap)))
    rows = [r for r in window_cores(source.height, side, stride)
            if r[2] > window.row_off and r[1] < window.row_off + window.height]
    cols = [c for c in window_cores(source.width, side, stride)
            if c[2] > window.col_off and c[1] < window.col_off + window.width]
    stats = SamStats()
    total = len(rows) * len(cols)
    with rasterio.open(class_path) as class_ds, rasterio.open(prob_path) as prob_ds, \
            rasterio.open(refined_path, "r+") as out_ds:
        for row_start, core_r0, core_r1 in rows:
            for col_start, core_c0, core_c1 in cols:
                if should_cancel is not None and should_cancel():
                    raise CancelledError("The run was cancelled; nothing was written.")
                sam_window = PixelWindow(row_start, col_start, min(side, source.height - row_start),
                                         min(side, source.width - col_start))
                _refine_window(sam, source, window, sam_window, (core_r0, core_r1, core_c0, core_c1),
                               class_ds, prob_ds, out_ds, settings, stats, mask_predictor or predict_masks,
                               threshold)
                if progress is not None:
                    progress(stats.windows, total)
    return stats


def _refine_window(sam, source, request: PixelWindow, sam_window: PixelWindow, core_bounds, class_ds, prob_ds,
                   out_ds, settings: SamSettings, stats: SamStats, mask_predictor, threshold: float) -> None:
    # The part of the SAM window inside the request, in request-grid coordinates.
    r0, r1 = max(sam_window.row_off, request.row_off), min(sam_window.row_off + sam_window.height,
                                                          request.row_off + request.height)
    c0, c1 = max(sam_window.col_off, request.col_off), min(sam_window.col_off + sam_window.width,
                                                          request.col_off + request.width)
    if r1 <= r0 or c1 <= c0:
        return
    shape = (sam_window.height, sam_window.width)
    inside = (slice(r0 - sam_window.row_off, r1 - sam_window.row_off),
              slice(c0 - sam_window.col_off, c1 - sam_window.col_off))
    grid = Window(c0 - request.col_off, r0 - request.row_off, c1 - c0, r1 - r0)
    classes = np.full(shape, NODATA_CLASS, np.uint8)
    classes[inside] = class_ds.read(1, window=grid)
    probs = np.full((prob_ds.count, *shape), np.nan, np.float32)
    probs[(slice(None), *inside)] = prob_ds.read(window=grid)
    core_r0, core_r1, core_c0, core_c1 = core_bounds
    core = np.zeros(shape, bool)
    core[max(core_r0, r0) - sam_window.row_off:min(core_r1, r1) - sam_window.row_off,
         max(core_c0, c0) - sam_window.col_off:min(core_c1, c1) - sam_window.col_off] = True
    prompts = region_prompts(classes, probs, core)
    stats.windows += 1
    if not prompts:
        stats.per_window.append({"prompts": 0, "embed_s": 0.0, "decode_s": 0.0})
        return
    rgb, valid = source.read(sam_window)
    start = time.perf_counter()
    with torch.inference_mode():
        embedding = sam.model.get_image_embeddings(_pixels(rgb, sam.image_size, sam.device))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    masks, scores = mask_predictor(sam, embedding, prompts, shape)
    decode_s = time.perf_counter() - start
    valid &= classes != NODATA_CLASS
    refined, kept = fuse(classes, probs, valid, prompts, masks, settings.min_agreement, settings.margin, threshold)
    stats.sam_score_sum += float(sum(scores))
    stats.prompts += len(prompts)
    stats.kept += sum(kept)
    stats.dropped += len(kept) - sum(kept)
    stats.embed_s += embed_s
    stats.decode_s += decode_s
    stats.per_window.append({"prompts": len(prompts), "embed_s": embed_s, "decode_s": decode_s})
    # Only the core is this window's to decide; the nodata class never changes.
    write = core & (classes != NODATA_CLASS)
    current = out_ds.read(1, window=grid)
    current = np.where(write[inside], refined[inside], current)
    out_ds.write(current, 1, window=grid)
