"""What one training step sees: random crops with their labels, distillation views, region crops per class.

Every draw comes from the step's `rng`, in the order the step asks for them, so a seed fixes the
whole run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from backend.engine.raster import PixelWindow

from .distill import DistillViews, native_area, native_source, resize_square, sample_views, view_side
from .sampling import GridBox, PixelBox, grid_box_on, pure_boxes, random_crop_boxes, region_boxes, rounded


class BatchSampler:
    """Batches from the training rectangle of `data` (a finetune.TrainingData) for `options` (TrainOptions)."""

    def __init__(self, data, options, crop_px: int, input_px: int, num_classes: int, device: torch.device):
        self.data = data
        self.options = options
        self.crop_px = crop_px
        self.input_px = input_px
        self.num_classes = num_classes
        self.device = device
        self.native = native_source(data.source)
        self.distill_area = native_area(data.source, data.train_window)
        self.distill_side = view_side(self.distill_area, input_px)
        self.regions = self._class_regions()

    def _class_regions(self) -> dict[int, list[GridBox]]:
        """Region boxes per class inside the training rectangle (label-grid pixels): the boxes of its labelled
        polygons whose sqrt(area) is region_min_px-region_max_px native pixels; a class without any gets
        filler boxes instead (squares mostly of that class, e.g. the background), sized by the same rule.
        Sets `region_counts` (per class line: polygon and filler boxes, its polygon parts and their sizes)."""
        data, options, rng = self.data, self.options, np.random.default_rng(self.options.seed)
        area = data.split.train
        native_per_pixel = (data.source.dataset.width / data.source.width,
                            data.source.dataset.height / data.source.height)
        boxes, ids = region_boxes(data.grid, area, data.transform, native_per_pixel, 0.0, math.inf)
        native = math.sqrt(native_per_pixel[0] * native_per_pixel[1])  # native pixels per label-grid pixel
        regions: dict[int, list[GridBox]] = {}
        sizes: dict[int, list[float]] = {}
        for box, class_id in zip(boxes, ids):
            size_px = math.sqrt((box[2] - box[0]) * (box[3] - box[1])) * native
            sizes.setdefault(class_id, []).append(size_px)
            if options.region_min_px <= size_px <= options.region_max_px:
                regions.setdefault(class_id, []).append(box)
        self.filler_side_native_px = self._filler_side(native)
        counts: dict[str, dict] = {}
        for class_id in range(self.num_classes):
            polygons = len(regions.get(class_id, []))
            filler = []
            if not polygons and self.filler_side_native_px is not None:
                filler = pure_boxes(data.grid, area, class_id, self.filler_side_native_px / native, 16, rng)
                regions[class_id] = filler
            parts = sizes.get(class_id, [])
            counts[data.grid.class_lines[class_id]] = {
                "polygon_boxes": polygons, "filler_boxes": len(filler), "polygon_parts": len(parts),
                "polygon_parts_sqrt_area_native_px": ([round(min(parts), 1), round(max(parts), 1)]
                                                      if parts else None)}
        self.region_counts = counts
        return {k: v for k, v in regions.items() if v}

    def _filler_side(self, native: float) -> float | None:
        """The side (native pixels) of filler boxes: half a training crop, grown to region_min_px or shrunk to
        region_max_px (so sqrt(area) obeys the polygons' rule); None when the training rectangle cannot hold
        one of region_min_px."""
        train = self.data.split.train
        side = min(max(self.crop_px / 2 * native, self.options.region_min_px), self.options.region_max_px)
        if side > min(train.height, train.width) * native:
            return None
        return side

    @property
    def region_alignment_runs(self) -> bool:
        """Whether the steps draw region crops: region boxes of at least two classes, and a weight above 0."""
        return len(self.regions) >= 2 and self.options.region_weight > 0

    def region_record(self) -> dict:
        """What the model's metadata says of region-category alignment."""
        return {"ran": self.region_alignment_runs, "why_not": self.region_warning(),
                "filler_side_native_px": (round(self.filler_side_native_px, 1)
                                          if self.filler_side_native_px is not None else None),
                "per_class": self.region_counts}

    def region_warning(self) -> str | None:
        """One sentence when region-category alignment cannot run (None when it runs or is turned off)."""
        if self.region_alignment_runs or self.options.region_weight <= 0:
            return None
        low, high = f"{self.options.region_min_px:g}", f"{self.options.region_max_px:g}"
        missing = []
        for line, counts in self.region_counts.items():
            if counts["polygon_boxes"] or counts["filler_boxes"]:
                continue
            sizes = counts["polygon_parts_sqrt_area_native_px"]
            if sizes is None:
                missing.append(f"'{line}' (no polygon in the training part)")
                continue
            many = counts["polygon_parts"]
            measured = f"{sizes[0]:g}" if sizes[0] == sizes[1] else f"{sizes[0]:g}-{sizes[1]:g}"
            missing.append(f"'{line}' ({many} polygon part{'s' if many > 1 else ''} of {measured} native pixels)")
        several = len(missing) > 1
        filler = (f"and the training part is too small for a square of {low} native pixels"
                  if self.filler_side_native_px is None else
                  f"nor a {self.filler_side_native_px:.0f}-pixel square at least 80 % of {'them' if several else 'it'}")
        return ("Region-category alignment did not run, so the model was trained without it: it needs region boxes "
                f"of at least two classes, and {', '.join(missing)} {'have' if several else 'has'} no labelled "
                f"polygon in the training part whose sqrt(box area) is {low}-{high} native pixels, {filler}. Label "
                f"some larger polygons of {'these classes' if several else 'that class'} to use it.")

    def _window(self, box: GridBox, size: int) -> PixelBox:
        """The size x size label-grid box nearest `box`, inside the train rect."""
        pixels = rounded(box)
        train = self.data.split.train
        row0 = min(max(pixels.row0, train.row0), train.row1 - size)
        col0 = min(max(pixels.col0, train.col0), train.col1 - size)
        return PixelBox(row0, col0, row0 + size, col0 + size)

    def crop_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) pixels 0..255 and (B, S, S) labels of random training crops."""
        size = self.crop_px
        boxes = random_crop_boxes(self.data.split.train, size, self.options.batch_size, rng)
        pixels, labels = [], []
        for box in boxes:
            rows, cols = self._window(box, size).slices
            rgb, lab = self.data.rgb[:, rows, cols], self.data.grid.labels[rows, cols]
            if self.options.augment:
                turns, flip = int(rng.integers(4)), bool(rng.integers(2))
                rgb, lab = np.rot90(rgb, turns, axes=(1, 2)), np.rot90(lab, turns)
                if flip:
                    rgb, lab = rgb[:, :, ::-1], lab[:, ::-1]
            pixels.append(np.ascontiguousarray(rgb))
            labels.append(np.ascontiguousarray(lab))
        return (torch.from_numpy(np.stack(pixels)).to(self.device),
                torch.from_numpy(np.stack(labels).astype(np.int64)).to(self.device))

    def distill_views(self, rng: np.random.Generator) -> DistillViews:
        """Global views read at native resolution with their boxes and local views (distill.py)."""
        return sample_views(self.native, self.distill_area, self.input_px, self.options.batch_size,
                            self.options.distill_boxes, rng)

    def region_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(R, 3, I, I) region crops resized to the model input, and their class ids (balanced)."""
        if len(self.regions) < 2 or self.options.region_weight <= 0:
            return None
        class_ids = list(self.regions)
        picked = rng.choice(class_ids, size=self.options.regions_per_step, replace=True)
        crops, ids = [], []
        for class_id in picked:
            candidates = self.regions[int(class_id)]
            box = grid_box_on(candidates[int(rng.integers(len(candidates)))], self.data.transform,
                              self.native.transform)
            rgb, _ = self.native.read(PixelWindow(box.row0, box.col0, box.height, box.width))
            if rgb.shape[1] < 2 or rgb.shape[2] < 2:
                continue
            if self.options.augment and rng.integers(2):
                rgb = rgb[:, :, ::-1]
            crops.append(resize_square(torch.from_numpy(np.ascontiguousarray(rgb))[None].to(self.device),
                                       self.input_px))
            ids.append(int(class_id))
        if len(set(ids)) < 2:
            return None
        return torch.cat(crops), torch.tensor(ids, device=self.device)
