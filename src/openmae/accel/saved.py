"""Tensors autograd keeps for backward, kept as recipes instead (`accel.mlp`, `accel.weight_casts`).

Some tensors a training step keeps for backward are cheap functions of tensors that stay alive
anyway:

- the bf16 (fp16) copy of an fp32 weight that autocast makes for each matrix product, which the
  product keeps for its input gradient: ViT-B/16 with the paper's decoder has 112M weights, 224 MB
  of bf16 copies held from forward until backward reaches each layer (`weight_casts=recompute`);
- a GELU's output, which fc2 keeps for its weight gradient (`mlp=recompute`, `accel.mlp`);
- a layer norm's output, which the next product keeps for its weight gradient while the norm keeps
  its input (`norm=recompute`, `accel.norms`).

Inside `recipes(rule, ...)` a `saved_tensors_hooks` pair offers every tensor autograd saves to the
rules; one that recognises it stores a `Recipe` (a source tensor, a function, the view's geometry)
and backward rebuilds the tensor from it: the same kernel on the same input, so losses and
gradients are bit-identical. Contexts nest: an inner one adds its rules to the outer one's hooks
(autograd applies only the innermost hooks).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from openmae import hardware
from openmae.accel.kernels import LOW_PRECISIONS

# Weights below this size are left alone: each rebuild costs a call (tens of microseconds in
# backward), and a 2^18-element weight's bf16 copy is only 512 KB. ViT-B/16's smallest matrix
# (the decoder's 512 x 512 projection) is rebuilt; none of the tiny config's is.
MIN_REBUILT_WEIGHT = 2**18


class Recipe(NamedTuple):
    """How backward rebuilds a saved tensor: `rebuild(source)` viewed with the saved geometry."""

    source: torch.Tensor
    rebuild: Callable[[torch.Tensor], torch.Tensor]
    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    version: int  # the source's version counter: an in-place change before backward is refused


Rule = Callable[[torch.Tensor], Recipe | None]
_open: list[Rule] | None = None  # the rules of the open hooks context; nested contexts add theirs


@contextlib.contextmanager
def recipes(*rules: Rule) -> Iterator[None]:
    """Within the block, a saved tensor that one of `rules` recognises is kept as its recipe."""
    global _open
    if _open is not None:  # the outer context's hooks are the ones autograd calls: lend them these rules
        outer = _open
        outer.extend(rules)
        try:
            yield
        finally:
            del outer[len(outer) - len(rules) :]
        return
    _open = list(rules)
    try:
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, _open), _unpack):
            yield
    finally:
        _open = None


def _pack(rules: list[Rule], saved: torch.Tensor) -> torch.Tensor | Recipe:
    for rule in rules:
        recipe = rule(saved)
        if recipe is not None:
            return recipe
    return saved


def _unpack(packed: torch.Tensor | Recipe) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    if packed.source._version != packed.version:
        raise RuntimeError(
            "a tensor that backward rebuilds from a weight or an activation was changed in place "
            "between forward and backward (set accel.weight_casts=keep, accel.mlp=plain and "
            "accel.norm=keep to keep copies)"
        )
    with torch.no_grad():
        return packed.rebuild(packed.source).as_strided(packed.size, packed.stride, packed.offset)


def recipe_for_view(saved: torch.Tensor, source: torch.Tensor, rebuild: Callable) -> Recipe:
    """The recipe of `saved`, a view of the tensor that `rebuild(source)` makes."""
    return Recipe(source, rebuild, saved.size(), saved.stride(), saved.storage_offset(), source._version)


def parameter_casts(saved: torch.Tensor) -> Recipe | None:
    """A rule: `saved` is (a view of) a low-precision copy of a parameter of at least
    `MIN_REBUILT_WEIGHT` elements made by `.to()`, as autocast's casts are; backward casts the
    parameter again."""
    if saved.dtype not in LOW_PRECISIONS:
        return None
    cast = saved._base if saved._is_view() else saved
    node = cast.grad_fn
    if node is None or node.name() != "ToCopyBackward0":
        return None
    param = getattr(node.next_functions[0][0], "variable", None)  # the AccumulateGrad of a leaf
    # (a parameter, or any leaf tensor that requires grad: its cast is rebuilt alike)
    if param is None or param.dtype in LOW_PRECISIONS or param.device != cast.device:
        return None
    if param.shape != cast.shape or param.stride() != cast.stride() or param.numel() < MIN_REBUILT_WEIGHT:
        return None
    return recipe_for_view(saved, param, functools.partial(_cast, dtype=saved.dtype))


def rebuilt_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of `model` whose casts `parameter_casts` would rebuild (none: no hooks needed)."""
    return [p for p in model.parameters() if p.requires_grad and p.numel() >= MIN_REBUILT_WEIGHT]


def cast_seconds(weights: list[torch.nn.Parameter], dtype: torch.dtype) -> float:
    """What casting `weights` to `dtype` once costs here (best of 3): what backward pays a step to
    rebuild them."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for weight in weights:
                _cast(weight, dtype)
            hardware.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def _cast(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return param.detach().to(dtype)
