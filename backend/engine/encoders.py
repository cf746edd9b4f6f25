"""Image encoders: normalised crops (B, 3, H, W) -> dense patch features (B, H/p, W/p, D), float32.

The sliding-window engine only needs this one call, so the runtime that
computes it is interchangeable: torch eager (the reference), a compiled
CPU runtime (runtimes.py), or the null encoder that `farslip bench
--null-encoder` uses to measure everything around the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .dense import dense_patch_features

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer


class Encoder(Protocol):
    name: str

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


def crop_size(visual: VisionTransformer) -> int:
    """The side of the square crops the vision tower was trained on (224 for the FarSLIP models)."""
    size = visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def autocast_enabled(device: torch.device, half: bool | None) -> bool:
    """fp16 autocast on CUDA by default (`half=None`); never on CPU, where fp32 is both exact and fastest."""
    if device.type != "cuda":
        return False
    return True if half is None else bool(half)


class TorchEncoder:
    """The vision tower in eager torch, with the training-free last block (dense.py)."""

    def __init__(self, visual: VisionTransformer, attention: str, device: torch.device, half: bool | None = None):
        self.visual = visual
        self.attention = attention
        self.device = device
        # A model converted with `models.to_half` runs fp16 end to end (as RS-OVSS runs its evaluation).
        self.fp16_weights = visual.conv1.weight.dtype == torch.float16
        self.autocast = autocast_enabled(device, half) and not self.fp16_weights
        self.name = "torch-fp16" if self.autocast or self.fp16_weights else "torch"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            features = dense_patch_features(self.visual, pixels, self.attention)
        return features.float()


class DenseTower(torch.nn.Module):
    """The dense path as a module, for exporters that trace a forward()."""

    def __init__(self, visual: VisionTransformer, attention: str):
        super().__init__()
        self.visual = visual
        self.attention = attention

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return dense_patch_features(self.visual, pixels, self.attention)


class NullEncoder:
    """A near zero-cost stand-in with the encoder's output shape: each patch's centre pixel through a
    fixed random projection.

    The output varies with the image, so classes, polygons and their counts stay realistic; only
    the model's own time is gone. Used to measure the host side (`farslip bench --null-encoder`).
    The centre pixel, not the patch mean: averaging every crop's pixels cost a tenth of the engine's
    time, which is the stand-in's, not the host side's.
    """

    name = "null"
    threads = 1  # its ops are tiny, as a GPU's are to the host: a team of threads only waits at barriers

    def __init__(self, visual: VisionTransformer, device: torch.device):
        self.patch: int = visual.conv1.kernel_size[0]
        generator = torch.Generator().manual_seed(0)
        # Orthonormal rows: a unit 3-vector maps to a unit feature, so the output needs no normalising pass.
        rows, _ = torch.linalg.qr(torch.randn(visual.output_dim, 3, generator=generator))
        self.projection = rows.T.contiguous().to(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        half = self.patch // 2
        centres = pixels[:, :, half::self.patch, half::self.patch].permute(0, 2, 3, 1).contiguous()
        return F.normalize(centres, dim=-1) @ self.projection

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The global (CLS) path's stand-in, for the quality estimate's region checks: (B, D)."""
        return pixels.mean(dim=(2, 3)) @ self.projection
