"""bf16 matrix products on the CPU: the native kernel, or exact fp32 GEMMs on bf16 values.

On CPUs without bf16 matrix instructions (AVX2-only x86, e.g. AMD Zen 2/3 or Intel before Cooper
Lake), PyTorch's bf16 GEMM falls back to a generic kernel that runs 8-20x slower than its fp32 one,
so plain bf16 autocast makes training far slower, not faster. There, computing the product as an
fp32 GEMM is faster and means the same: a bf16 value widens to fp32 exactly, the product of two
bf16 values is exact in fp32, the sum accumulates in fp32 and the result is rounded to bf16 once
(the contract of a bf16 GEMM with fp32 accumulation). On CPUs with AVX512-BF16 or AMX the native
kernel is the faster one. `Bf16Gemm` times both for each product it meets, forward and backward
together, and keeps the faster; activations stay bf16 for the backward pass either way.

How: `Bf16Gemm` is a torch function mode. It sees the Python-level calls of the forward pass
(`F.linear`, `@` / `matmul` / `bmm` / `mm`, `F.conv2d`) of any model, without changing its code,
and runs a product it widens as one autograd function (`WidenedLinear`, `WidenedMatmul`,
`WidenedConv2d`) whose backward computes its gradients as fp32 GEMMs too. Everything else passes
through at the cost of one Python call per op of forward (and of custom autograd functions'
Python backward); autograd's built-in backward formulas never pass through it.
Autocast's casts happen before the function, as autocast makes them (`x.to(bf16)`), so autograd
sees the same graph of casts and products as with native products.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from openmae.accel.tuner import Autotuner, Candidates, Scouted

GEMM_PATHS = ("auto", "native", "fp32")

bf16 = torch.bfloat16
# A native product's scout runs about 1/SCOUT_SHARE of it and at least SCOUT_ROWS rows of a matrix
# (or one entry of a stack of products or a batch of images).
SCOUT_SHARE = 256
SCOUT_ROWS = 16
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# `x @ y` reaches a function mode as `Tensor.matmul`.
_MATMULS = {torch.matmul, torch.bmm, torch.mm, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.mm}


class Bf16Gemm(TorchFunctionMode):
    """Run each CPU bf16 matrix product and convolution natively or as fp32, as `path` says
    ("native", "fp32", or "auto": the faster for each call's shapes, forward and backward timed
    together, once)."""

    def __init__(self, tuner: Autotuner, path: str = "auto") -> None:
        super().__init__()
        if path not in GEMM_PATHS:
            raise ValueError(f"accel.gemm must be one of {', '.join(GEMM_PATHS)}; got {path!r}")
        self.tuner = tuner
        self.path = path
        self.chosen: dict[tuple, str] = {}
        self.keys: dict[tuple, str] = {}  # signature -> the tuner's key
        self.census: Census | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.census is not None:
            self.census.ops += 1
        product = _product(func, args, kwargs)
        if product is not None and self.path_for(product) == "fp32":
            return product.widened()
        return func(*args, **kwargs)

    def path_for(self, product: Product) -> str:
        if self.path != "auto":
            return self.path
        signature = product.signature()
        name = self.chosen.get(signature)
        if name is None:
            key = product.key()
            name = self.tuner.choose("bf16 gemm", key, lambda: product.timing_runs())
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
    """What one step sends through the mode: every call (each pays the mode's Python call) and
    the calls of each product shape."""

    ops: int = 0
    calls: dict[tuple, int] = field(default_factory=dict)

    def key(self) -> str:
        """What identifies the step for the tuner: its calls and product shapes, hashed."""
        shapes = repr(sorted(self.calls.items(), key=repr))
        return (
            f"{len(self.calls)} shapes, {self.ops} calls, {hashlib.sha256(shapes.encode()).hexdigest()[:12]}"
        )


def dispatch_overhead_s(samples: int = 400) -> float:
    """Seconds a call costs more when it passes through a Python function mode, measured here."""
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


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# The products the mode can widen: their operands as autocast would cast them, and both paths.


@dataclass
class Product:
    """One call of a product computed in bf16: which kind, its tensor operands as passed (fp32 ones
    under autocast), and a convolution's options."""

    kind: str  # "linear", "matmul" or "conv2d"
    operands: list[torch.Tensor | None]  # linear, conv2d: input, weight, bias; matmul: a, b
    options: tuple = ()  # conv2d: stride, padding, dilation, groups

    def widened(self) -> torch.Tensor:
        """The product by `WIDENED`, on the operands cast to bf16 as autocast casts them (with
        autograd: a weight's gradient flows back through its cast)."""
        cast = [None if t is None else t.to(bf16) for t in self.operands]
        return WIDENED[self.kind].apply(*cast, *self.options)

    def signature(self) -> tuple:
        return (self.kind, *(_layout(t) for t in self.operands), self.options, self.wants_grad())

    def key(self) -> str:
        shapes = " ".join(str(_layout(t)) for t in self.operands if t is not None)
        options = f" {list(self.options)}" if self.options else ""
        return f"{self.kind} {shapes}{options}" + (" fwd+bwd" if self.wants_grad() else " fwd")

    def wants_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.operands)

    def timing_runs(self) -> Candidates:
        """Forward (and backward, where the call needs it) of each path on random bf16 operands laid
        out as this call's, from a private generator (timing draws nothing from the run's streams).
        The native path can be sized up first on a slice of the rows (`Scouted`): on a CPU without
        bf16 units one native run can take seconds."""
        generator = torch.Generator().manual_seed(0)
        like = [None if t is None else _random_like(t, generator) for t in self.operands]
        wants_grad = self.wants_grad()

        def run(product: Callable, operands: list[torch.Tensor | None]) -> None:
            out = product(*operands, *self.options)
            inputs = [t for t in operands if t is not None and t.requires_grad] if wants_grad else []
            if inputs:
                with torch.autocast("cpu", enabled=False):  # backward runs outside autocast
                    torch.autograd.grad(out, inputs, torch.ones_like(out))

        native, widened = NATIVE[self.kind], WIDENED[self.kind].apply

        def native_run() -> None:
            run(native, like)

        sliced, scale = self.scout_operands(like)
        doubled, half_scale = self.scout_operands(like, slices=2)
        wider = (lambda: run(native, doubled)) if half_scale >= 2 else None
        scouted = Scouted(native_run, lambda: run(native, sliced), scale, wider) if scale >= 2 else native_run
        return {"native": scouted, "fp32": lambda: run(widened, like)}

    def scout_operands(
        self, like: list[torch.Tensor | None], slices: int = 1
    ) -> tuple[list[torch.Tensor | None], float]:
        """`like` cut to about `slices`/`SCOUT_SHARE` of the product's work (the leading rows of a
        linear's or a matrix product's first operand, or the leading batch entries of stacked products
        and convolutions), and the work's multiple of the cut's (1 when there is nothing to cut)."""
        first, *rest = like
        if self.kind == "linear":
            first = first.reshape(-1, first.shape[-1])  # [M, K]
        stacked = self.kind == "conv2d" or (self.kind == "matmul" and first.dim() > 2)
        size = first.shape[0]
        keep = math.ceil(size / SCOUT_SHARE)
        if not stacked:
            keep = max(SCOUT_ROWS, keep)
        keep = min(size, slices * keep)
        if keep == 0:  # an empty product (e.g. a decoder tail with no hidden patch)
            return like, 1.0
        cut = [_leading(first, keep)]
        if self.kind == "matmul" and stacked:
            cut.append(_leading(rest.pop(0), keep))  # the same leading dims
        return [*cut, *rest], size / keep


def _product(func, args: tuple, kwargs: dict) -> Product | None:
    """The call as a `Product` when it is a CPU product computed in bf16, else None."""
    if func is F.linear and len(args) >= 2:
        x, weight, *rest = args
        product = Product("linear", [x, weight, rest[0] if rest else kwargs.get("bias")])
    elif func in _MATMULS and len(args) == 2 and not kwargs:
        a, b = args
        matrices = isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2
        if not (matrices and a.shape[:-2] == b.shape[:-2]):
            return None  # broadcasting and vector products stay native
        product = Product("matmul", [a, b])
    elif func is F.conv2d:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        call = dict(zip(names, args, strict=False)) | kwargs
        if isinstance(call.get("padding", 0), str):
            return None  # "same" / "valid": left to the native kernel
        options = (
            tuple(_pair(call.get("stride", 1))),
            tuple(_pair(call.get("padding", 0))),
            tuple(_pair(call.get("dilation", 1))),
            int(call.get("groups", 1)),
        )
        product = Product("conv2d", [call["input"], call["weight"], call.get("bias")], options)
    else:
        return None
    return product if _computes_in_bf16(product.operands) else None


def _computes_in_bf16(tensors: list[torch.Tensor | None]) -> bool:
    """Whether a product of these CPU tensors runs in bf16: all bf16 already, or fp32 ones that
    autocast casts to bf16."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == bf16
    dtypes = (bf16, torch.float32) if autocast_bf16 else (bf16,)
    present = [t for t in tensors if t is not None]
    # Plain tensors only: subclasses (DTensor, fake tensors) keep their own handling.
    return all(type(t) in _PLAIN and t.device.type == "cpu" and t.dtype in dtypes for t in present)


def _layout(x: torch.Tensor | None) -> tuple | None:
    """What decides a product's speed: shape, and whether a matrix is read transposed."""
    return None if x is None else (tuple(x.shape), x.is_contiguous())


def _transposed(x: torch.Tensor) -> bool:
    """Whether `x` is a dense matrix (stack) read transposed, e.g. a weight's `.t()`."""
    return x.dim() >= 2 and not x.is_contiguous() and x.mT.is_contiguous()


def _leading(x: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` entries of `x` along dim 0, a fresh leaf of the same layout and grad need."""
    return x.detach()[:count].requires_grad_(x.requires_grad)


def _random_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random bf16 values shaped as `t`, transposed in its last two dims where `t` is."""
    transposed = _transposed(t)
    shape = (*t.shape[:-2], t.shape[-1], t.shape[-2]) if transposed else tuple(t.shape)
    out = torch.randn(shape, generator=generator).to(bf16)
    return (out.mT if transposed else out).requires_grad_(t.requires_grad)


# ------------------------------------------------------------------------------------------------
# The widened products: bf16 in, bf16 out, every product of forward and backward an fp32 GEMM.


class WidenedLinear(torch.autograd.Function):
    """`F.linear(x, weight, bias)` on bf16 tensors `[..., K]`, `[N, K]`, `[N]` -> `[..., N]`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        out = _widened_product(x2, weight.t(), bias)  # [M, N]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [M, N]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _widened_product(g, weight).reshape(x.shape)  # [M, K]
        if ctx.needs_input_grad[1]:
            grad_w = _widened_product(g.t(), x.reshape(-1, x.shape[-1]))  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # as the native product's backward: a bf16 sum
        return grad_x, grad_w, grad_b


class WidenedMatmul(torch.autograd.Function):
    """`a @ b` on bf16 tensors `[..., M, K]`, `[..., K, N]` with the same leading dims."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _widened_product(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _widened_product(grad, b.mT) if ctx.needs_input_grad[0] else None
        grad_b = _widened_product(a.mT, grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class WidenedConv2d(torch.autograd.Function):
    """`F.conv2d` on bf16 tensors, computed in fp32 forward and backward (e.g. a patch embedding)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        wide_bias = None if bias is None else bias.float()
        out = F.conv2d(x.float(), weight.float(), wide_bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.options = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return out.to(bf16)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        wanted = [*ctx.needs_input_grad[:2], ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        grads = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight.float(), ctx.bias_sizes,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, wanted,
        )  # fmt: skip
        rounded = [None if g is None else g.to(bf16) for g in grads]
        return (*rounded, None, None, None, None)


WIDENED = {"linear": WidenedLinear, "matmul": WidenedMatmul, "conv2d": WidenedConv2d}
NATIVE = {"linear": F.linear, "matmul": torch.matmul, "conv2d": F.conv2d}


def _widened_product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b (+ bias)` for bf16 `[..., M, K]`, `[..., K, N]` computed in fp32 and rounded to bf16
    once; the fp32 operands live in this thread's workspace."""
    workspace = fp32_workspace()
    wide_a, wide_b = workspace.widen("a", a), workspace.widen("b", b)
    out = workspace.buffer("out", (*a.shape[:-1], b.shape[-1]))
    if bias is None:
        torch.matmul(wide_a, wide_b, out=out)
    else:
        torch.addmm(workspace.widen("bias", bias), wide_a, wide_b, out=out)
    return out.to(bf16)


class Fp32Workspace:
    """Named fp32 buffers that grow to the largest size asked for and are then reused.

    Fresh fp32 temporaries of every size, freed among the activations kept for backward, leave the
    heap fragmented (measured: ~200 MB more peak RSS on ViT-B/16 at batch 8); the workspace keeps
    its largest operands (four buffers, 46 MB for ViT-B/16 at batch 8) for the life of the thread.
    Views are cached per (name, shape, strides): a training step asks for the same few shapes again
    and again, and a cached view costs no tensor op to hand out.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def buffer(
        self, name: str, shape: tuple[int, ...], strides: tuple[int, ...] | None = None
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

    def widen(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`x` as fp32 in buffer `name`; a transposed matrix stays transposed (no reordering copy)."""
        strides = tuple(x.stride()) if _transposed(x) else None
        return self.buffer(name, tuple(x.shape), strides).copy_(x)


_thread_state = threading.local()


def fp32_workspace() -> Fp32Workspace:
    """This thread's workspace (autograd runs a CPU backward pass on the thread that calls it)."""
    if not hasattr(_thread_state, "workspace"):
        _thread_state.workspace = Fp32Workspace()
    return _thread_state.workspace


def release_fp32_workspace() -> None:
    """Free this thread's workspace: where no product runs widened, only the measurements filled it
    (ViT-B/16 bf16 at batch 8: ~70 MB held for the rest of the run, measured on an AVX512-BF16 CPU)."""
    if hasattr(_thread_state, "workspace"):
        del _thread_state.workspace
