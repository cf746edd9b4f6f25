"""Training's mixed precision on CUDA (no GPU here: torch's view of the GPU is stood in for): bf16 only on a GPU
that computes it in hardware; a T4 or V100, which only emulates bf16 (many times slower), trains in fp16 with a
gradient scaler; the GPU asked about is the training's, not the current one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.optimisation import Optimisation, amp_dtype


@pytest.fixture
def gpus(monkeypatch):
    """cuda:0 an A100 (compute capability 8.0), cuda:1 a T4 (7.5) on which torch can still make bf16 tensors
    (emulated: torch.cuda.is_bf16_supported() says True), GPU 0 current."""
    majors = {0: 8, 1: 7}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=majors[torch.device(device).index]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)


def test_a_gpu_that_only_emulates_bf16_trains_in_fp16_and_one_that_computes_it_in_bf16(gpus):
    assert amp_dtype(torch.device("cuda", 1)) == torch.float16
    assert amp_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert amp_dtype(torch.device("cpu")) is None


def test_the_trainer_on_a_t4_uses_fp16_with_a_gradient_scaler(gpus, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: SimpleNamespace(enabled=enabled))
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    optimisation = Optimisation([("w", parameter)], 1e-3, 0.0, 1, 10, torch.device("cuda", 1))
    assert optimisation.amp_dtype == torch.float16 and optimisation.scaler.enabled
