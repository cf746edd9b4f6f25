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
  sqrt(area) is 64-1024 native pixels (classes without any such polygon, e.g. the
  background, get filler boxes: squares at least 80 % of the class whose sqrt(area)
  obeys the same rule), read at native resolution and resized to the model's input,
  CLS embeddings vs "a satellite image of {class}", multi-positive contrastive. It
  needs boxes of two classes; without them it does not run, and the run says so.
FarSLIP's global image-caption loss is left out: a user's labels have no captions.
Total: 1.0 patch + 0.1 distillation + 1.0 region (the TrainOptions weights).
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
from backend.engine.errors import CancelledError, InputError
from backend.engine.models import LoadedModel
from backend.engine.presets import parse_class_lines
from backend.engine.raster import PixelWindow, RasterSource
from backend.engine.text import LOGIT_SCALE, TextEmbedder, query_index

from . import adapters
from .batches import BatchSampler
from .labels import LabelGrid
from .losses import (
    balanced_class_weights,
    patch_distillation_loss,
    patch_label_loss,
    patch_targets,
    region_alignment_loss,
)
from .optimisation import Optimisation
from .sampling import SpatialSplit, pixel_sizes, steps_for

# The options live without torch (the command line checks them before a model loads); their names stay here too.
from .train_options import DEFAULT_LR, TrainOptions  # noqa: F401
from .validation import Validation

if TYPE_CHECKING:
    from open_clip.model import CLIP

REGION_PROMPT = "a satellite image of {}"


@dataclass
class TrainingData:
    """The labelled window in memory, on the raster's processing grid."""

    rgb: np.ndarray  # (3, H, W) float32 0..255
    grid: LabelGrid
    split: SpatialSplit
    transform: Affine  # of the label window
    source: RasterSource  # for validation through the engine

    @property
    def pixel_size(self) -> tuple[float, float]:
        """A label-grid pixel's width and height in map units (true lengths on a rotated grid too)."""
        return pixel_sizes(self.transform)

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


class TrainingDiverged(InputError):
    """The loss or the trained weights stopped being finite numbers: the run cannot go on, and nothing after its
    last finished epoch is worth keeping. `finished_epochs`: the epochs before the one that diverged."""

    def __init__(self, sentence: str, finished_epochs: int):
        super().__init__(sentence)
        self.finished_epochs = finished_epochs


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
    """One fine-tuning run: the student (a copy of the loaded model), its teacher and the class texts, and
    the losses of a step. Batches come from a BatchSampler, parameter updates from an Optimisation,
    the figures from a Validation."""

    def __init__(self, loaded: LoadedModel, data: TrainingData, options: TrainOptions, total_steps: int):
        self.loaded = loaded
        self.data = data
        self.options = options
        self.device = loaded.device
        torch.manual_seed(options.seed)  # before the copy: LoRA's initial weights are drawn in prepare()
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

        self.batches = BatchSampler(data, options, self.crop_px, self.input_px, self.num_classes, self.device)
        self.distill_side = self.batches.distill_side
        named = {id(parameter): name for name, parameter in self.model.named_parameters()}
        self.optimisation = Optimisation([(named[id(p)], p) for p in self.parameters], options.learning_rate,
                                         options.weight_decay, options.warmup_steps, total_steps, self.device)
        self.validation = Validation(loaded, data, self.embedder, options.attention, options.eval_batch_size)

    # --- model passes -----------------------------------------------------------------------

    def tokens(self, visual, pixels: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) unnormalised projected patch tokens of 0..255 pixels (the release's forward_v2)."""
        with self.optimisation.autocast():
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
        views = self.batches.distill_views(rng)
        student = self.tokens(self.model.visual, views.global_pixels)
        target = self.teacher_pooled(views.local_pixels)
        grid_boxes = views.boxes.to(self.device)
        grid_boxes[:, 1:] /= self.patch
        return patch_distillation_loss(student, grid_boxes, target)

    def losses(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The step's losses; the batches are drawn from `rng` in this order: crops, views, regions."""
        options = self.options
        pixels, labels = self.batches.crop_batch(rng)
        out: dict[str, torch.Tensor] = {}
        with self.optimisation.autocast():
            dense = dense_patch_features(self.model.visual, normalize_pixels(pixels), options.attention)
        dense = dense.float()
        if options.patch_loss_weight > 0:
            targets = patch_targets(labels, self.patch, self.num_classes)
            out["patch"] = patch_label_loss(dense, self.query_text, self.owner, targets, LOGIT_SCALE,
                                            self.class_weights)
        if options.distill_weight > 0 and options.distill_boxes > 0:
            out["distill"] = self.distill_loss(rng)
        regions = self.batches.region_batch(rng)
        if regions is not None:
            crops, ids = regions
            with self.optimisation.autocast():
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
        self.optimisation.apply(loss)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    def weights_are_finite(self) -> bool:
        """Whether every trained tensor still holds finite numbers (one overflowing update spoils them all)."""
        return adapters.all_finite(self.parameters)

    def validate(self, should_cancel: Callable[[], bool] | None = None, model: CLIP | None = None) -> dict:
        """Metrics on the validation strip of the model being trained (or of `model`)."""
        return self.validation.run(self.model if model is None else model, should_cancel)


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
            if not math.isfinite(values["loss"]) or not trainer.weights_are_finite():
                what = (f"the loss is {values['loss']}, not a finite number" if not math.isfinite(values["loss"])
                        else "the trained weights are no longer finite numbers")
                raise TrainingDiverged(f"The training diverged at epoch {epoch} step {step + 1} ({what}); no model "
                                       "was written.", epoch - 1)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            done = (epoch - 1) * steps_per_epoch + step + 1
            if progress is not None:
                progress(done, total, {"phase": "train", "epoch": epoch, "epochs": options.epochs,
                                       "loss": values["loss"], "lr": trainer.optimisation.learning_rate})
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
