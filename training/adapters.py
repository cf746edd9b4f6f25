"""Which parameters of the vision tower train: LoRA, the last blocks, or all of it.

LoRA is implemented as a weight parametrization (W + B A * alpha/r) rather
than with peft's module wrappers: the engine's dense path reads the last
block's `attn.in_proj_weight` directly and open_clip's nn.MultiheadAttention
calls F.multi_head_attention_forward with its weights, bypassing any wrapped
Linear. A parametrization is seen by every reader of the weight, merges into
a plain state dict exactly, and can be switched off to get the base model
back (the frozen teacher for patch distillation) without a second copy.

The text tower is frozen for every method: class prompts keep their
embeddings, so the fine-tuned model's text cache equals the base model's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from .train_options import METHODS  # torch-free: the command line checks --method before torch loads

if TYPE_CHECKING:
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer


class LoraDelta(nn.Module):
    """W -> W + (B @ A) * scale, with B initialised to zero (starts as the identity)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + (self.lora_b @ self.lora_a).to(weight.dtype) * self.scale


def _lora_targets(visual: VisionTransformer) -> list[tuple[nn.Module, str]]:
    targets = []
    for block in visual.transformer.resblocks:
        targets.append((block.attn, "in_proj_weight"))
        targets.append((block.attn.out_proj, "weight"))
        targets.append((block.mlp.c_fc, "weight"))
        targets.append((block.mlp.c_proj, "weight"))
    return targets


def prepare(model: CLIP, method: str, rank: int = 8, alpha: float = 16.0,
            last_blocks: int = 2) -> list[nn.Parameter]:
    """Freeze the model, then make the method's parameters trainable; returns them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    visual = model.visual
    if method == "lora":
        for module, name in _lora_targets(visual):
            parametrize.register_parametrization(module, name, LoraDelta(getattr(module, name), rank, alpha))
        return [p for n, p in model.named_parameters() if "lora_" in n]
    if method == "last-blocks":
        modules = [*list(visual.transformer.resblocks[-last_blocks:]), visual.ln_post]
        for module in modules:
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        visual.proj.requires_grad_(True)
    else:
        for parameter in visual.parameters():
            parameter.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name (LoRA factors, or the unfrozen weights)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def all_finite(tensors) -> bool:
    """Whether every tensor holds only finite numbers (no NaN, no infinity): one check, one device sync."""
    tensors = list(tensors)
    return not tensors or bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))


def set_adapters_enabled(model: nn.Module, enabled: bool) -> bool:
    """Switch LoRA deltas on/off; returns whether the model has any."""
    found = False
    for module in model.modules():
        if isinstance(module, LoraDelta):
            module.enabled = enabled
            found = True
    return found


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain open_clip state dict with LoRA deltas folded into the weights."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".parametrizations." not in name:
            state[name] = tensor
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            prefix = f"{module_name}." if module_name else ""
            with torch.no_grad():
                state[prefix + tensor_name] = getattr(module, tensor_name).detach().clone()
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in state.items()}
