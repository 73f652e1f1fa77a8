"""bf16 matrix products on the CPU: the native kernel, or exact fp32 GEMMs on bf16 values.

On CPUs without bf16 matrix instructions (AVX2-only x86, e.g. AMD Zen 2/3 or Intel before Cooper
Lake), PyTorch's bf16 GEMM falls back to a generic kernel that runs 8-20x slower than its fp32 one,
so plain bf16 autocast makes training far slower, not faster. There, computing the product as an
fp32 GEMM is faster and means the same: a bf16 value widens to fp32 exactly, the product of two
bf16 values is exact in fp32, the sum accumulates in fp32 and the result is rounded to bf16 once
(the contract of a bf16 GEMM with fp32 accumulation). On CPUs with AVX512-BF16 or AMX the native
kernel is the faster one. `Bf16Gemm` times both for each product shape it meets and keeps the
faster; activations stay bf16 for the backward pass either way.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmae.accel.tuner import Autotuner

GEMM_PATHS = ("auto", "native", "fp32")

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


class Bf16Gemm(TorchDispatchMode):
    """Run each CPU bf16 matrix product and convolution natively or as fp32, as `path` says
    ("native", "fp32", or "auto": the faster for each op and shape, measured once).

    Covers `mm`, `addmm`, `bmm`, `baddbmm` and `convolution` with its backward. A dispatch mode
    sees the ops that autocast and autograd emit, in the forward and the backward pass alike, so
    it works for any model without changing its code. Other ops pass through untouched.
    """

    def __init__(self, tuner: Autotuner, path: str = "auto") -> None:
        super().__init__()
        if path not in GEMM_PATHS:
            raise ValueError(f"accel.gemm must be one of {', '.join(GEMM_PATHS)}; got {path!r}")
        self.tuner = tuner
        self.path = path
        self.chosen: dict[tuple, str] = {}
        self.keys: dict[tuple, str] = {}  # signature -> the tuner's key
        self.census: Census | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.census is not None:
            self.census.ops += 1
        if (func in _GEMMS or func in _CONVS) and _is_cpu_bf16(args):
            if self.path_for(func, args, kwargs) == "fp32":
                return as_fp32(func, args, kwargs)
        return func(*args, **kwargs)

    def path_for(self, func, args: tuple, kwargs: dict) -> str:
        if self.path != "auto":
            return self.path
        signature = (func, *(_layout(a) for a in args))
        name = self.chosen.get(signature)
        if name is None:
            key = f"{func.__name__} " + " ".join(str(_layout(a)) for a in args if isinstance(a, torch.Tensor))
            runs = lambda: {
                "native": lambda: func(*args, **kwargs),
                "fp32": lambda: as_fp32(func, args, kwargs),
            }
            name = self.tuner.choose("bf16 gemm", key, runs)
            self.chosen[signature], self.keys[signature] = name, key
        if self.census is not None:
            self.census.calls[signature] = self.census.calls.get(signature, 0) + 1
        return name

    def saving_per_step(self, census: Census) -> float | None:
        """Seconds a step saves against all-native products, from the census's calls and the measured
        seconds of each shape; None when some shape's timing is not known (restored choices)."""
        saved = 0.0
        for signature, calls in census.calls.items():
            seconds = self.tuner.seconds_of("bf16 gemm", self.keys[signature])
            if not seconds:
                return None
            saved += calls * (seconds["native"] - seconds[self.chosen[signature]])
        return saved


@dataclass
class Census:
    """What one step sends through the mode: every op (each pays the mode's Python dispatch) and
    the calls of each product shape."""

    ops: int = 0
    calls: dict[tuple, int] = field(default_factory=dict)


def dispatch_overhead_s(samples: int = 400) -> float:
    """Seconds an op costs more when it passes through a Python dispatch mode, measured here."""
    x = torch.zeros(4)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(samples):
            x.add_(1.0)
        return time.perf_counter() - start

    plain = min(run() for _ in range(3))
    with _PassThrough():
        through = min(run() for _ in range(3))
    return max(through - plain, 0.0) / samples


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def as_fp32(func, args: tuple, kwargs: dict):
    """`func` on bf16 tensors computed in fp32, the result rounded to bf16 once."""
    if func in _GEMMS:
        workspace = fp32_workspace()
        wide = [workspace.widen(i, a) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
        out = workspace.buffer("out", _product_shape(wide[-2], wide[-1]))
        return _GEMMS[func](*wide, **kwargs, out=out).to(torch.bfloat16)
    wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    out = func(*wide, **kwargs)
    if isinstance(out, tuple):  # convolution_backward: (grad_input, grad_weight, grad_bias)
        return tuple(o.to(torch.bfloat16) if isinstance(o, torch.Tensor) else o for o in out)
    return out.to(torch.bfloat16)


def _layout(x) -> tuple | object:
    """What decides a product's speed: shape, and whether a matrix is read transposed."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.is_contiguous())
    if isinstance(x, list):  # a convolution's stride, padding...
        return tuple(x)
    return x


def _product_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    """Shape of `a @ b` for `[..., M, K] @ [..., K, N]` (mm, bmm)."""
    return (*a.shape[:-1], b.shape[-1])


class Fp32Workspace:
    """Named fp32 buffers that grow to the largest size asked for and are then reused.

    Fresh fp32 temporaries of every size, freed among the activations kept for backward, leave the
    heap fragmented (measured: ~200 MB more peak RSS on ViT-B/16 at batch 8); the workspace keeps
    its largest operands (four buffers, 46 MB for ViT-B/16 at batch 8) for the life of the thread.
    Views are cached per (name, shape, strides): a training step asks for the same few shapes again
    and again, and a cached view costs no tensor op to hand out.
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
