"""Attention by the fastest kernel for each shape a run meets, or by the one a config forces.

`TunedAttention` is set as `Attention.kernel` on every attention layer of a model. For each
(device, dtype, qkv shape, with or without gradients) it times the candidate kernels of
`openmae.accel.kernels`, forward and backward, on random inputs of that shape, and runs the
fastest from then on; a kernel that keeps the `[B, heads, N, N]` probabilities for backward must be
`KEEPING_PROBABILITIES_HANDICAP` faster than the others to be chosen. On a GPU there is one
candidate, SDPA, which picks flash or memory-efficient kernels itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from openmae.accel.kernels import (
    LOW_PRECISIONS,
    eager_attention,
    eager_lowp_attention,
    eager_recompute_attention,
    per_head_attention,
    per_head_fp32_attention,
    widened_flash_attention,
)
from openmae.accel.tuner import Autotuner, Candidates, Scouted
from openmae.models.layers import sdpa_attention

KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "per_head": per_head_attention,
    "per_head_fp32": per_head_fp32_attention,
    "eager": eager_attention,
    "eager_lowp": eager_lowp_attention,
    "eager_recompute": eager_recompute_attention,
    "widened_flash": widened_flash_attention,
}
# "auto": the fastest kernel; "lean": the fastest of those that keep no [B, heads, N, N] matrix for
# backward (what the flash kernels keep: the output and log-sum-exp), for runs short of memory.
ATTENTION_PATHS = ("auto", "lean", *KERNELS)
KEEP_PROBABILITIES = ("eager", "eager_lowp", "per_head", "per_head_fp32")
# Under "auto", a kernel that keeps the probabilities must be this share faster than one that does
# not to be chosen. Attention is ~10% of a ViT-B step, so a quarter of it is ~2.5% of the step; the
# fp32 probabilities of ViT-B's decoder at batch 8 are ~160 MB, 5% of the process (2.5 GB at batch
# 128). Where they win clearly (tiny's decoder: per_head 2.5x faster than SDPA) they are still taken.
KEEPING_PROBABILITIES_HANDICAP = 0.25
# Kernels whose low-precision products run natively whatever the bf16 GEMM path (inside one op, or
# inside one autograd function): on a CPU without bf16 units one of their runs can take a tenth of a
# second or more at ViT-B sizes, so they are sized up on a slice of the batch first (`Scouted`).
NATIVE_LOWP_PRODUCTS = ("sdpa", "per_head")
# Their scouts run an eighth of the batch (at least one image), not the 256th a product's scout
# runs: a kernel is many small operations per image, and on a few images their fixed costs and idle
# threads would be most of the scout's time, scaled up into an estimate several times too high
# (SDPA bf16 of tiny's encoder, 128 images: one image estimated 71 ms for a 17 ms run, 16 images 20).
SCOUT_BATCH_SHARE = 8


def candidates_for(device: torch.device, dtype: torch.dtype, lean: bool = False) -> list[str]:
    """The kernels worth timing for a device and dtype, the plainest first; with `lean`, only those
    that keep no probabilities for backward."""
    if device.type != "cpu":
        return ["sdpa"]
    names = ["sdpa", "eager", "per_head"]
    if dtype in LOW_PRECISIONS:  # softmax left in low precision; products widened for CPUs without bf16 units
        names += ["eager_lowp", "per_head_fp32", "widened_flash"]
    if lean:
        names = [n for n in names if n not in KEEP_PROBABILITIES] + ["eager_recompute"]
    return names


class TunedAttention:
    """An `Attention.kernel`: packed qkv `[B, N, 3, heads, head_dim]` -> `[B, N, heads, head_dim]`
    by the kernel `path` names, or with `path="auto"` (`"lean"`) by the fastest (memory-lean)
    kernel for each shape."""

    def __init__(self, tuner: Autotuner, path: str = "auto") -> None:
        if path not in ATTENTION_PATHS:
            raise ValueError(f"accel.attention must be one of {', '.join(ATTENTION_PATHS)}; got {path!r}")
        self.tuner = tuner
        self.path = path
        self.chosen: dict[tuple, str] = {}  # per call signature: a dict lookup on the hot path

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        return KERNELS[self.kernel_for(qkv)](qkv)

    def kernel_for(self, qkv: torch.Tensor) -> str:
        if self.path not in ("auto", "lean"):
            return self.path
        grad = torch.is_grad_enabled() and qkv.requires_grad
        signature = (qkv.device, qkv.dtype, tuple(qkv.shape), grad)
        name = self.chosen.get(signature)
        if name is None:
            lean = grad and self.path == "lean"  # without backward nothing is kept anyway
            names = candidates_for(qkv.device, qkv.dtype, lean)
            key = f"{qkv.device.type} {str(qkv.dtype).removeprefix('torch.')} {list(qkv.shape)}"
            key += " fwd+bwd" if grad else " fwd"
            key += " lean" if lean else ""
            handicaps = dict.fromkeys(KEEP_PROBABILITIES, KEEPING_PROBABILITIES_HANDICAP) if grad else {}
            name = self.tuner.choose("attention", key, lambda: timing_runs(names, qkv, grad), handicaps)
            self.chosen[signature] = name
        return name


def timing_runs(names: list[str], like: torch.Tensor, grad: bool) -> Candidates:
    """One run per kernel, forward (and backward with `grad`), on random inputs shaped like `like`.

    The inputs come from a private generator: timing draws nothing from the run's random streams.
    """
    generator = torch.Generator(like.device).manual_seed(0)
    qkv = torch.randn(like.shape, generator=generator, device=like.device).to(like.dtype)
    qkv.requires_grad_(grad)
    grad_out = torch.randn(qkv.shape[:2] + qkv.shape[3:], generator=generator, device=like.device)
    grad_out = grad_out.to(like.dtype)

    def run(kernel: Callable[[torch.Tensor], torch.Tensor], batch: int = qkv.shape[0]) -> None:
        inputs = qkv if batch == qkv.shape[0] else qkv.detach()[:batch].requires_grad_(grad)
        out = kernel(inputs)
        if grad:
            with torch.autocast(like.device.type, enabled=False):  # backward runs outside autocast
                torch.autograd.grad(out, inputs, grad_out[:batch].to(out.dtype))

    scout_batch = math.ceil(qkv.shape[0] / SCOUT_BATCH_SHARE)
    scouts = like.device.type == "cpu" and like.dtype in LOW_PRECISIONS and scout_batch < qkv.shape[0]

    def candidate(kernel: Callable[[torch.Tensor], torch.Tensor], scouted: bool) -> Callable[[], None]:
        def full() -> None:
            run(kernel)

        if not scouted:
            return full
        wider = (lambda: run(kernel, 2 * scout_batch)) if 2 * scout_batch < qkv.shape[0] else None
        return Scouted(full, lambda: run(kernel, scout_batch), qkv.shape[0] / scout_batch, wider)

    return {name: candidate(KERNELS[name], scouts and name in NATIVE_LOWP_PRODUCTS) for name in names}
