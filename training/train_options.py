"""What a training takes: TrainOptions (every knob, with its command-line flag and the values it takes) and the
methods and teachers, without torch: the command line and the server check a run's options before a model loads.
training/finetune.py runs them."""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.engine.options import BATCH_MAX, Range

METHODS = ("lora", "last-blocks", "full")
TEACHERS = ("frozen", "active")
DEFAULT_LR = {"lora": 2e-4, "last-blocks": 2e-5, "full": 1e-5}


# Upper bounds of the options: values past them exhaust the memory (a batch of crops is held with its
# gradients) or the time of any machine, or make the training diverge; each is refused with its sentence.
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000
MAX_LR = 10.0
MAX_TRAIN_BATCH = 256  # crops (and region crops) per step, with their activations kept for the gradient
MAX_CROP_PX = 1024
MAX_LOSS_WEIGHT = 100.0
MAX_DISTILL_BOXES = 64
MAX_REGION_PX = 1_000_000.0
MAX_BUFFER_PX = 4096
MAX_LORA_RANK = 256
MAX_LORA_ALPHA = 1024.0
MAX_LAST_BLOCKS = 64  # more than any vision tower has; the model's own count is checked once it loads
MAX_SEED = 2**63 - 1  # torch.manual_seed takes at most 64 bits


def option(default, flag: str, allowed: Range | None = None, why: str = "", error: str | None = None):
    """A TrainOptions field with its command-line spelling and the values it takes (run_checks.check_options):
    `allowed`, with `why` after the range in the sentence, or `error` ({value} replaced) as the whole sentence."""
    return field(default=default, metadata={"flag": flag, "range": allowed, "why": why, "error": error})


@dataclass
class TrainOptions:
    method: str = option("lora", "--method")
    epochs: int = option(5, "--epochs", Range(1, MAX_EPOCHS))
    lr: float | None = option(None, "--lr", Range(0.0, MAX_LR, low_open=True),
                              " (higher rates make the training diverge)")  # None: DEFAULT_LR[method]
    batch_size: int = option(4, "--batch-size", Range(1, MAX_TRAIN_BATCH),
                             " (each step holds that many crops and their gradients in memory)")
    steps_per_epoch: int | None = option(  # None: about two passes over the training area
        None, "--steps-per-epoch", Range(1, MAX_STEPS),
        error=f"--steps-per-epoch must be at least 1 and at most {MAX_STEPS} (leave it out for a number from the "
              "training area); got {value}.")
    crop_px: int | None = option(None, "--crop-px", Range(32, MAX_CROP_PX),
                                 " pixels (leave it out for the model's input size)")  # None: the model's input
    patch_loss_weight: float = option(
        1.0, "--patch-loss-weight", Range(0.0, MAX_LOSS_WEIGHT),
        error=f"--patch-loss-weight must be a finite number ≥ 0 (0 turns it off) and at most {MAX_LOSS_WEIGHT:g}; "
              "got {value}.")
    class_balance: float = option(  # patch loss class weights ~ frequency^-class_balance (0: unweighted)
        0.5, "--class-balance", Range(0.0, 1.0), " (0: classes unweighted, 1: weighted by inverse frequency)")
    distill_weight: float = option(0.1, "--distill-weight", Range(0.0, MAX_LOSS_WEIGHT), " (0 turns it off)")
    region_weight: float = option(1.0, "--region-weight", Range(0.0, MAX_LOSS_WEIGHT), " (0 turns it off)")
    distill_boxes: int = option(4, "--distill-boxes", Range(0, MAX_DISTILL_BOXES),
                                " boxes per global view (0 turns distillation off)")
    teacher: str = option("frozen", "--teacher")  # frozen (base model) or active (the network being trained)
    region_min_px: float = option(  # region boxes: sqrt(area) in native pixels, as FarSLIP filters them
        64.0, "--region-min-px", Range(1.0, MAX_REGION_PX), " native pixels (the side of a region box's area)")
    region_max_px: float = option(1024.0, "--region-max-px", Range(1.0, MAX_REGION_PX),
                                  " native pixels (the side of a region box's area)")
    regions_per_step: int = option(8, "--regions-per-step", Range(1, MAX_TRAIN_BATCH),
                                   " (--region-weight 0 turns region alignment off)")
    weight_decay: float = option(0.01, "--weight-decay", Range(0.0, 1.0))
    warmup_steps: int = option(0, "--warmup-steps", Range(0, MAX_STEPS))
    validation_fraction: float = option(
        0.2, "--validation-fraction", Range(0.05, 0.5),
        " (the validation fraction: the share of the labelled extent held out to measure the training)")
    buffer_px: int = option(32, "--buffer-px", Range(0, MAX_BUFFER_PX),
                            " pixels (the gap between the training part and the validation strip)")
    lora_rank: int = option(8, "--lora-rank", Range(1, MAX_LORA_RANK))
    lora_alpha: float = option(16.0, "--lora-alpha", Range(0.0, MAX_LORA_ALPHA, low_open=True),
                               " (LoRA's update is scaled by alpha / rank)")
    last_blocks: int = option(2, "--last-blocks", Range(1, MAX_LAST_BLOCKS), " (vision blocks to train)")
    attention: str = option("segearth", "--attention")
    eval_batch_size: int = option(8, "--eval-batch-size", Range(1, BATCH_MAX),
                                  " (crops per batch when validating)")
    augment: bool = option(True, "--augment")
    seed: int = option(0, "--seed", Range(0, MAX_SEED),
                       error=f"--seed must be a whole number from 0 to {MAX_SEED}; got {{value}}.")

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.method])
