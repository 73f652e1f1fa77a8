"""How a training step runs in a given precision: fp32, bf16 autocast, or fp16 autocast (GPU).

One place for the precision contexts that the training loop and `mae bench` share.

On CPUs without bf16 matrix instructions (AVX2-only x86, e.g. AMD Zen 2/3 or Intel before Cooper
Lake), PyTorch's bf16 GEMM falls back to a generic kernel that runs 8-20x slower than its fp32 one,
so plain bf16 autocast makes training far slower, not faster. `Bf16GemmInFp32` computes those
matrix products as fp32 GEMMs instead: a bf16 value widens to fp32 exactly, the product of two bf16
values is exact in fp32, the sum accumulates in fp32 and the result is rounded to bf16 once. That is
the contract of a bf16 GEMM with fp32 accumulation, so results differ from the slow kernel only by
summation order; activations are still stored in bf16 for the backward pass.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmae import hardware

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

_aten = torch.ops.aten
# Matrix products and their `out=` forms, which write into the workspace.
_GEMMS = {
    _aten.mm.default: _aten.mm.out,
    _aten.addmm.default: _aten.addmm.out,
    _aten.bmm.default: _aten.bmm.out,
    _aten.baddbmm.default: _aten.baddbmm.out,
}
# The patch embedding's convolution has the same slow bf16 fallback (forward and backward).
_CONVS = {_aten.convolution.default, _aten.convolution_backward.default}


def check_precision(precision: str, device: torch.device | str) -> None:
    """Reject an unknown precision, or fp16 off a CUDA GPU (it needs a grad scaler), before anything runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA GPU (it uses a grad scaler), not {device}; use bf16")


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """`torch.autocast` to bf16 or fp16, or nothing for fp32. Enter it around the forward pass only."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def needs_gemm_in_fp32(device: torch.device | str, precision: str) -> bool:
    """Whether bf16 matrix products on `device` are faster as fp32 GEMMs (CPU without bf16 units)."""
    return (
        precision == "bf16"
        and torch.device(device).type == "cpu"
        and not hardware.cpu_has_matrix_units(torch.bfloat16)
    )


def gemm_context(
    device: torch.device | str, precision: str, gemm_in_fp32: bool = True
) -> contextlib.AbstractContextManager:
    """Enter around forward *and* backward: `Bf16GemmInFp32` where asked for and useful, else nothing."""
    if gemm_in_fp32 and needs_gemm_in_fp32(device, precision):
        return Bf16GemmInFp32()
    return contextlib.nullcontext()


class Bf16GemmInFp32(TorchDispatchMode):
    """Run CPU bf16 matrix products and convolutions as fp32 ones, rounding results to bf16.

    Covers `mm`, `addmm`, `bmm`, `baddbmm` and `convolution` with its backward. A dispatch mode
    sees the ops that autocast and autograd emit, in the forward and the backward pass alike, so
    it works for any model without changing its code. Other ops pass through untouched.

    The widened operands and the fp32 product of a matrix multiply live in a per-thread
    `Fp32Workspace` that is reused from call to call: only the bf16 result is a new tensor. Fresh
    fp32 temporaries of every size, freed among the activations kept for backward, would leave
    the heap fragmented (measured: ~200 MB more peak RSS on ViT-B/16 at batch 8). The workspace
    keeps its largest operands (four buffers, 46 MB for ViT-B/16 at batch 8) for the life of the
    thread.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS and _is_cpu_bf16(args):
            workspace = fp32_workspace()
            wide = [workspace.widen(i, a) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
            out = workspace.buffer("out", _product_shape(wide[-2], wide[-1]))
            return _GEMMS[func](*wide, **kwargs, out=out).to(torch.bfloat16)
        if func in _CONVS and _is_cpu_bf16(args):
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            out = func(*wide, **kwargs)
            if isinstance(out, tuple):  # convolution_backward: (grad_input, grad_weight, grad_bias)
                return tuple(o.to(torch.bfloat16) if isinstance(o, torch.Tensor) else o for o in out)
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def _product_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """Shape of `a @ b` for `[..., M, K] @ [..., K, N]` (mm, bmm)."""
    return (*a.shape[:-1], b.shape[-1])


class Fp32Workspace:
    """Named fp32 buffers that grow to the largest size asked for and are then reused.

    Views are cached per (name, shape, strides): a training step asks for the same few shapes
    again and again, and a cached view costs no tensor op to hand out.
    """

    def __init__(self) -> None:
        self.buffers: dict[int | str, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def buffer(
        self, name: int | str, shape: tuple[int, ...], strides: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """An fp32 view of buffer `name` with `shape` and dense `strides` (default: contiguous);
        its old contents are overwritten by the next user."""
        key = (name, shape, strides)
        view = self.views.get(key)
        if view is None:
            numel = math.prod(shape)
            flat = self.buffers.get(name)
            if flat is None or flat.numel() < numel:
                flat = self.buffers[name] = torch.empty(numel, dtype=torch.float32)
                self.views = {k: v for k, v in self.views.items() if k[0] != name}  # old buffer
            view = flat[:numel].view(shape) if strides is None else flat.as_strided(shape, strides)
            self.views[key] = view
        return view

    def widen(self, name: int | str, x: torch.Tensor) -> torch.Tensor:
        """`x` as fp32 in buffer `name`; a transposed matrix stays transposed (no reordering copy)."""
        transposed = not x.is_contiguous() and x.mT.is_contiguous()  # e.g. a weight's `.t()`
        return self.buffer(name, tuple(x.shape), tuple(x.stride()) if transposed else None).copy_(x)


_thread_state = threading.local()


def fp32_workspace() -> Fp32Workspace:
    """This thread's workspace (autograd runs a CPU backward pass on the thread that calls it)."""
    if not hasattr(_thread_state, "workspace"):
        _thread_state.workspace = Fp32Workspace()
    return _thread_state.workspace


def _is_cpu_bf16(args: tuple) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
