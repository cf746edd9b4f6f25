"""How the trainable parameters move: AdamW, a warm-up then cosine learning rate, gradient clipping,
and mixed precision on CUDA (fp32 everywhere else).

Weight decay applies to the weight matrices only: as open_clip's trainer (which FarSLIP's release uses)
decides, parameters of fewer than two dimensions (biases, LayerNorm gains, class embedding) and those
named as biases, norms (`ln`, `bn`) or `logit_scale` are in a second group without decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

CLIP_NORM = 1.0


def decays(name: str, parameter: torch.nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies to the parameter `name`: open_clip's rule."""
    return not (parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed precision of training on `device`: bf16 on a GPU that computes it in hardware (compute capability
    8 and later: Ampere, Hopper), fp16 with a gradient scaler on older ones (a T4 or V100 only emulates bf16, many
    times slower); None (fp32) off CUDA. Asked of `device` itself, not of the current GPU."""
    if device.type != "cuda":
        return None
    if torch.version.hip:  # ROCm GPUs compute bf16
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_properties(device).major >= 8 else torch.float16


class Optimisation:
    """One optimiser step per `apply(loss)`; `state()` / `restore()` carry it across a resumed run."""

    def __init__(self, parameters: Iterable[tuple[str, torch.nn.Parameter]], learning_rate: float,
                 weight_decay: float, warmup_steps: int, total_steps: int, device: torch.device):
        named = list(parameters)
        self.parameters = [parameter for _, parameter in named]
        decayed = [parameter for name, parameter in named if decays(name, parameter)]
        kept = [parameter for name, parameter in named if not decays(name, parameter)]
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=learning_rate,
                                           betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp_dtype = amp_dtype(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def autocast(self):
        """The precision the model passes run in: CUDA's mixed precision, or plain fp32."""
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def apply(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters, CLIP_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def restore(self, saved: dict) -> None:
        """Continue a checkpointed run; the schedule's lambda is this run's, so a longer run stretches the cosine.
        A checkpoint saved with one parameter group (weight decay on every parameter, before the decay was
        split) has its per-parameter state carried over by parameter order into this run's groups."""
        optimizer, scheduler = saved["optimizer"], saved["scheduler"]
        if len(optimizer["param_groups"]) != len(self.optimizer.param_groups):
            optimizer, scheduler = self._regrouped(optimizer, scheduler)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)

    def _regrouped(self, optimizer: dict, scheduler: dict) -> tuple[dict, dict]:
        """A single-group optimiser and scheduler state (parameter i: self.parameters[i]) in this run's groups."""
        from backend.engine.errors import InputError

        (old,) = optimizer["param_groups"] if len(optimizer["param_groups"]) == 1 else (None,)
        if old is None or len(old["params"]) != len(self.parameters):
            raise InputError("The checkpoint's optimiser state does not match the parameters this run trains, so it "
                             "cannot be resumed; start over with --overwrite instead of --resume.")
        position = {id(parameter): index for index, parameter in enumerate(self.parameters)}
        groups, state, new_index = [], {}, 0
        for group in self.optimizer.param_groups:
            indices = []
            for parameter in group["params"]:
                old_index = old["params"][position[id(parameter)]]
                if old_index in optimizer["state"]:
                    state[new_index] = optimizer["state"][old_index]
                indices.append(new_index)
                new_index += 1
            groups.append({**old, "weight_decay": group["weight_decay"], "params": indices})
        count = len(groups)
        scheduler = {**scheduler, "base_lrs": scheduler["base_lrs"][:1] * count,
                     "_last_lr": scheduler["_last_lr"][:1] * count}
        return {"state": state, "param_groups": groups}, scheduler
