"""The fine-tuning loop: crops and region boxes of the training part -> FarSLIP's losses -> AdamW.

One step (FARSLIP_METHOD.md section 6, plus the dense patch loss):
- a batch of random crops inside the training rectangle (flips / quarter turns),
  their dense patch features through the engine's own path (`dense_patch_features`);
- patch loss: cross-entropy of the patch-text logits (scale 50) against the
  rasterised labels, majority per patch, unlabelled patches ignored;
- patch-to-patch distillation (weight 0.1): global views read at native resolution
  and resized to the input (at least 2x coarser than native when the training area
  allows), 4 boxes each drawn as `RandomResizedCrop.get_params` draws them; the
  student's unnormalised tokens RoI-aligned in each box, against the teacher's mean
  token of that box cut from the native pixels and resized to the input (see
  `distill.py`). Teacher: `frozen` (default for small user data: the base model,
  LoRA switched off or a frozen copy of the base vision tower) or `active` (the
  release's choice: the network being trained, gradients on both sides);
- region-category alignment (weight 1.0): boxes of labelled polygons whose
  sqrt(area) is 64-1024 native pixels (and pure boxes of classes without such
  polygons, e.g. the background), read at native resolution and resized to the
  model's input, CLS embeddings vs "a satellite image of {class}", multi-positive
  contrastive.
FarSLIP's global image-caption loss is left out: a user's labels have no captions.
Text embeddings are computed once with the frozen text tower.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from affine import Affine

from backend.engine.dense import dense_patch_features, normalize_pixels
from backend.engine.errors import CancelledError
from backend.engine.models import LoadedModel
from backend.engine.raster import PixelWindow, RasterSource
from backend.engine.text import LOGIT_SCALE, TextEmbedder, parse_class_lines, query_index

from . import adapters
from .distill import native_area, native_source, resize_square, sample_views, view_side
from .evaluate import predict_classes, score, segmenter_for
from .labels import LabelGrid
from .losses import (
    balanced_class_weights,
    patch_distillation_loss,
    patch_label_loss,
    patch_targets,
    region_alignment_loss,
)
from .sampling import (
    Box,
    PixelBox,
    SpatialSplit,
    pure_boxes,
    random_crop_boxes,
    region_boxes,
    steps_for,
    to_pixels,
)

if TYPE_CHECKING:
    from open_clip.model import CLIP

REGION_PROMPT = "a satellite image of {}"
DEFAULT_LR = {"lora": 2e-4, "last-blocks": 2e-5, "full": 1e-5}


@dataclass
class TrainOptions:
    method: str = "lora"
    epochs: int = 5
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 4
    steps_per_epoch: int | None = None  # None: about two passes over the training area
    crop_px: int | None = None  # None: the model's input size
    patch_loss_weight: float = 1.0
    class_balance: float = 0.5  # patch loss class weights ~ frequency^-class_balance (0: unweighted)
    distill_weight: float = 0.1
    region_weight: float = 1.0
    distill_boxes: int = 4  # boxes per global view
    teacher: str = "frozen"  # frozen (base model) or active (the network being trained, as the release)
    region_min_px: float = 64.0  # region boxes: sqrt(area) in native pixels, as FarSLIP filters them
    region_max_px: float = 1024.0
    regions_per_step: int = 8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    validation_fraction: float = 0.2
    buffer_px: int = 32
    lora_rank: int = 8
    lora_alpha: float = 16.0
    last_blocks: int = 2
    attention: str = "segearth"
    eval_batch_size: int = 8
    augment: bool = True
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.method])


@dataclass
class TrainingData:
    """The labelled window in memory, on the raster's processing grid."""

    rgb: np.ndarray  # (3, H, W) float32 0..255
    grid: LabelGrid
    split: SpatialSplit
    transform: Affine  # of the label window
    source: RasterSource  # for validation through the engine

    @property
    def pixel_size(self) -> float:
        return abs(self.transform.a)

    @property
    def train_window(self) -> PixelWindow:
        """The training rectangle on the processing grid (absolute pixels)."""
        box, window = self.split.train, self.grid.window
        return PixelWindow(window.row_off + box.row0, window.col_off + box.col0, box.height, box.width)

    @property
    def validation_window(self) -> PixelWindow:
        """The validation strip on the processing grid (absolute pixels)."""
        box, window = self.split.validation, self.grid.window
        return PixelWindow(window.row_off + box.row0, window.col_off + box.col0, box.height, box.width)

    @property
    def validation_labels(self) -> np.ndarray:
        return self.grid.labels[self.split.validation.slices]


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    losses: dict
    val_miou: float | None
    seconds: float
    crops: int


@dataclass
class TrainState:
    epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)


def input_size(visual) -> int:
    size = visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def crop_size(visual, options: TrainOptions, split: SpatialSplit) -> int:
    """Training crop side: the model's input size, smaller when the training rectangle is."""
    patch = visual.conv1.kernel_size[0]
    side = min(options.crop_px or input_size(visual), split.train.height, split.train.width)
    return max(patch, side // patch * patch)


class Trainer:
    """Holds the student (a copy of the loaded model), the teacher, texts and the optimiser."""

    def __init__(self, loaded: LoadedModel, data: TrainingData, options: TrainOptions, total_steps: int):
        self.loaded = loaded
        self.data = data
        self.options = options
        self.device = loaded.device
        torch.manual_seed(options.seed)
        self.model = copy.deepcopy(loaded.model).float().to(self.device)
        self.parameters = adapters.prepare(self.model, options.method, rank=options.lora_rank,
                                           alpha=options.lora_alpha, last_blocks=options.last_blocks)
        self.teacher_visual = None
        if options.method != "lora" and options.teacher == "frozen":
            self.teacher_visual = copy.deepcopy(loaded.model.visual).float().to(self.device).eval()
            self.teacher_visual.requires_grad_(False)
        visual = self.model.visual
        self.patch = visual.conv1.kernel_size[0]
        self.input_px = input_size(visual)
        self.crop_px = crop_size(visual, options, data.split)
        self.native = native_source(data.source)
        self.distill_area = native_area(data.source, data.train_window)
        self.distill_side = view_side(self.distill_area, self.input_px)

        classes = parse_class_lines(data.grid.class_lines)
        self.num_classes = len(classes)
        queries, owner = query_index(classes)
        self.embedder = TextEmbedder(loaded)
        self.query_text = self.embedder.embed(queries).to(self.device)
        self.owner = torch.tensor(owner, device=self.device)
        region_embedder = TextEmbedder(loaded, templates=(REGION_PROMPT,))
        self.class_text = region_embedder.embed([c.name for c in classes]).to(self.device)
        counts = [data.split.train_pixels.get(line, 0) for line in data.grid.class_lines]
        self.class_weights = balanced_class_weights(counts, options.class_balance).to(self.device)
        self._prepare_regions()

        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.learning_rate, betas=(0.9, 0.98),
                                           eps=1e-6, weight_decay=options.weight_decay)
        warmup = options.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    # --- data -------------------------------------------------------------------------------

    def _prepare_regions(self) -> None:
        """Region boxes per class inside the training rectangle (map coordinates)."""
        data, rng = self.data, np.random.default_rng(self.options.seed)
        area = data.split.train_bounds
        native_pixel = data.pixel_size * data.source.width / data.source.dataset.width
        boxes, ids = region_boxes(data.grid, area, native_pixel, self.options.region_min_px,
                                  self.options.region_max_px)
        self.regions: dict[int, list[Box]] = {}
        for box, class_id in zip(boxes, ids):
            self.regions.setdefault(class_id, []).append(box)
        for class_id in range(self.num_classes):
            if len(self.regions.get(class_id, [])) < 4:
                extra = pure_boxes(data.grid, area, data.transform, class_id, self.crop_px // 2, 16, rng)
                self.regions.setdefault(class_id, []).extend(extra)
        self.regions = {k: v for k, v in self.regions.items() if v}

    def _window(self, box: Box, size: int | None = None) -> PixelBox:
        """A label-grid box for `box`, exactly size x size when `size` is given, inside the train rect."""
        pixels = to_pixels(box, self.data.transform)
        if size is None:
            return pixels
        train = self.data.split.train
        row0 = min(max(pixels.row0, train.row0), train.row1 - size)
        col0 = min(max(pixels.col0, train.col0), train.col1 - size)
        return PixelBox(row0, col0, row0 + size, col0 + size)

    def crop_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) pixels 0..255 and (B, S, S) labels of random training crops."""
        size = self.crop_px
        boxes = random_crop_boxes(self.data.split.train_bounds, size * self.data.pixel_size,
                                  self.options.batch_size, rng)
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

    def region_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(R, 3, I, I) region crops resized to the model input, and their class ids (balanced)."""
        if len(self.regions) < 2 or self.options.region_weight <= 0:
            return None
        class_ids = list(self.regions)
        picked = rng.choice(class_ids, size=self.options.regions_per_step, replace=True)
        crops, ids = [], []
        for class_id in picked:
            candidates = self.regions[int(class_id)]
            box = to_pixels(candidates[int(rng.integers(len(candidates)))], self.native.transform)
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

    # --- model passes -----------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def tokens(self, visual, pixels: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) unnormalised projected patch tokens of 0..255 pixels (the release's forward_v2)."""
        with self._autocast():
            tokens = dense_patch_features(visual, normalize_pixels(pixels.to(self.device)), self.options.attention,
                                          normalize=False)
        return tokens.float()

    def teacher_pooled(self, local_pixels: torch.Tensor) -> torch.Tensor:
        """The teacher's mean token of each local view: the base model (frozen), or the network being
        trained itself with gradients (active)."""
        if self.options.teacher == "active":
            return self.tokens(self.model.visual, local_pixels).mean(dim=(1, 2))
        with torch.no_grad():
            if self.teacher_visual is not None:
                return self.tokens(self.teacher_visual, local_pixels).mean(dim=(1, 2))
            adapters.set_adapters_enabled(self.model, False)
            try:
                return self.tokens(self.model.visual, local_pixels).mean(dim=(1, 2))
            finally:
                adapters.set_adapters_enabled(self.model, True)

    def distill_loss(self, rng: np.random.Generator) -> torch.Tensor:
        views = sample_views(self.native, self.distill_area, self.input_px, self.options.batch_size,
                             self.options.distill_boxes, rng)
        student = self.tokens(self.model.visual, views.global_pixels)
        target = self.teacher_pooled(views.local_pixels)
        grid_boxes = views.boxes.to(self.device)
        grid_boxes[:, 1:] /= self.patch
        return patch_distillation_loss(student, grid_boxes, target)

    def losses(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        options = self.options
        pixels, labels = self.crop_batch(rng)
        out: dict[str, torch.Tensor] = {}
        with self._autocast():
            dense = dense_patch_features(self.model.visual, normalize_pixels(pixels), options.attention)
        dense = dense.float()
        if options.patch_loss_weight > 0:
            targets = patch_targets(labels, self.patch, self.num_classes)
            out["patch"] = patch_label_loss(dense, self.query_text, self.owner, targets, LOGIT_SCALE,
                                            self.class_weights)
        if options.distill_weight > 0 and options.distill_boxes > 0:
            out["distill"] = self.distill_loss(rng)
        regions = self.region_batch(rng)
        if regions is not None:
            crops, ids = regions
            with self._autocast():
                embeddings = self.model.encode_image(normalize_pixels(crops))
            out["region"] = region_alignment_loss(embeddings.float(), ids, self.class_text, LOGIT_SCALE)
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {"patch": self.options.patch_loss_weight, "distill": self.options.distill_weight,
                   "region": self.options.region_weight}
        return functools.reduce(operator.add, [weights[name] * value for name, value in parts.items()])

    def step(self, rng: np.random.Generator) -> dict[str, float]:
        self.model.train()
        parts = self.losses(rng)
        loss = self.total(parts)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    # --- validation -------------------------------------------------------------------------

    def validate(self, should_cancel: Callable[[], bool] | None = None, model: CLIP | None = None) -> dict:
        """Metrics on the validation strip through the engine (`segment`'s own code path)."""
        segmenter = segmenter_for(self.loaded, self.data.grid.class_lines,
                                  model=self.model if model is None else model, embedder=self.embedder,
                                  attention=self.options.attention, batch_size=self.options.eval_batch_size)
        predicted = predict_classes(segmenter, self.data.source, self.data.validation_window, should_cancel)
        return score(self.data.validation_labels, predicted, self.data.grid.class_names)


def run_epochs(trainer: Trainer, state: TrainState, steps_per_epoch: int,
               save_checkpoint: Callable[[TrainState, bool], None],
               progress: Callable[[int, int, dict], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> TrainState:
    """Train from `state.epoch` to options.epochs; validate and checkpoint after each epoch."""
    options = trainer.options
    total = options.epochs * steps_per_epoch
    for epoch in range(state.epoch + 1, options.epochs + 1):
        rng = np.random.default_rng([options.seed, epoch])
        started = time.perf_counter()
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            if should_cancel is not None and should_cancel():
                raise CancelledError("Training was cancelled; no model was written.")
            values = trainer.step(rng)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            done = (epoch - 1) * steps_per_epoch + step + 1
            if progress is not None:
                progress(done, total, {"phase": "train", "epoch": epoch, "epochs": options.epochs,
                                       "loss": values["loss"], "lr": trainer.scheduler.get_last_lr()[0]})
        means = {k: v / steps_per_epoch for k, v in sums.items()}
        train_seconds = time.perf_counter() - started
        metrics = trainer.validate(should_cancel)
        miou = metrics["miou"] if metrics["miou"] is not None else 0.0
        record = EpochRecord(epoch, means["loss"], {k: v for k, v in means.items() if k != "loss"},
                             metrics["miou"], round(train_seconds, 3), steps_per_epoch * options.batch_size)
        state.history.append(asdict(record))
        state.epoch = epoch
        improved = miou > state.best_miou
        if improved:
            state.best_miou, state.best_epoch = miou, epoch
        save_checkpoint(state, improved)
        if progress is not None:
            progress(epoch * steps_per_epoch, total,
                     {"phase": "validate", "epoch": epoch, "epochs": options.epochs, "loss": means["loss"],
                      "losses": record.losses, "val_miou": metrics["miou"], "best_miou": state.best_miou,
                      "best_epoch": state.best_epoch})
    return state


def default_steps(data: TrainingData, options: TrainOptions, crop_px: int) -> int:
    if options.steps_per_epoch:
        return int(options.steps_per_epoch)
    return steps_for(data.split.train.height * data.split.train.width, crop_px, options.batch_size)
