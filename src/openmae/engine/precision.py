"""The precision a training step runs in: fp32, bf16 autocast, or fp16 autocast (GPU, grad scaler).

Faster bf16 matrix products on CPUs that lack bf16 units are `openmae.accel`'s concern.
"""

from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str, device: torch.device | str) -> None:
    """Reject an unknown precision, or fp16 off a CUDA GPU (it needs a grad scaler), before anything runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA GPU (it uses a grad scaler), not {device}; use bf16")


def autocast(
    device: torch.device | str, precision: Precision, cache_weights: bool = True
) -> contextlib.AbstractContextManager:
    """`torch.autocast` to bf16 or fp16, or nothing for fp32. Enter it around the forward pass only.

    Without `cache_weights` each weight is cast where it is used, and no cast outlives its use
    (autocast's cache otherwise keeps every cast weight until the forward ends)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache_weights)
