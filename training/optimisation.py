"""How the trainable parameters move: AdamW, a warm-up then cosine learning rate, gradient clipping,
and mixed precision on CUDA (fp32 everywhere else)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

CLIP_NORM = 1.0


class Optimisation:
    """One optimiser step per `apply(loss)`; `state()` / `restore()` carry it across a resumed run."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float,
                 warmup_steps: int, total_steps: int, device: torch.device):
        self.parameters = list(parameters)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, betas=(0.9, 0.98),
                                           eps=1e-6, weight_decay=weight_decay)

        def schedule(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp_dtype = None
        if device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
        """Continue a checkpointed run; the schedule's lambda is this run's, so a longer run stretches the cosine."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
