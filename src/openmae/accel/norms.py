"""Layer-norm outputs computed again in backward instead of kept (`accel.norm=recompute`).

In a pre-norm transformer each layer norm's output y = LN(x) goes straight into a matrix product
(attention's qkv, the MLP's fc1; the encoder's final norm into the decoder's embedding), which
keeps y, or under autocast y's bf16 copy, for its weight gradient, while the layer norm keeps its
own input x for its backward. y is a cheap function of x, so backward can compute it again when
the product asks for it: one `[B, N, D]` activation fewer per layer norm (ViT-B/16 with the
paper's decoder at batch 8: ~80 MB in fp32, ~40 MB in bf16) for one layer norm per norm in
backward. The same kernel on the same input under the same autocast state gives the same bits,
so losses and gradients do not change at all.

How: a forward hook on every `nn.LayerNorm` writes into its output's autograd node
(`grad_fn.metadata`) a weak reference to its input and the autocast state; `norm_outputs`, a rule
of `openmae.accel.saved` open around the step, recognises a saved tensor whose autograd history
leads to such a node through views and dtype casts only, and keeps it as a recipe.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from openmae.accel.saved import Recipe, recipe_for_view

NORM_CHOICES = ("recompute", "keep")

_KEY = "openmae.norm_input"
# Autograd nodes a norm's output may pass through on its way to the saved tensor: reshapes and the
# cast that autocast makes before a product.
_PASSED_THROUGH = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ToCopyBackward0")


class NormInput(NamedTuple):
    """What the forward hook notes on a norm's output node."""

    norm: nn.LayerNorm
    input: weakref.ref  # x: the norm keeps it for its own backward anyway
    autocast: tuple[bool, torch.dtype]  # the autocast state of x's device in forward


def note_norm_inputs(model: nn.Module) -> list[RemovableHandle]:
    """Hook every `nn.LayerNorm` of `model` so that `norm_outputs` can recognise its output."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return [norm.register_forward_hook(_note_input) for norm in norms]


def _note_input(norm: nn.LayerNorm, args: tuple, out: torch.Tensor) -> None:
    node = out.grad_fn
    if node is None:  # no gradients: nothing is kept
        return
    device_type = args[0].device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    node.metadata[_KEY] = NormInput(norm, weakref.ref(args[0]), autocast)


def norm_outputs(saved: torch.Tensor) -> Recipe | None:
    """A rule: `saved` is a layer norm's output, whole, possibly reshaped and cast; backward computes
    it again from the norm's input."""
    node = saved.grad_fn
    for _ in range(4):  # the output's node, or one a few reshapes and casts away
        if node is None or _KEY in node.metadata or node.name() not in _PASSED_THROUGH:
            break
        node = node.next_functions[0][0]
    if node is None or _KEY not in node.metadata:
        return None
    noted: NormInput = node.metadata[_KEY]
    x = noted.input()
    whole = saved.is_contiguous() and saved.storage_offset() == 0
    if x is None or not whole or saved.numel() != x.numel() or saved.device != x.device:
        return None  # not the whole output (the norm's statistics are outputs of its node too)
    rebuild = functools.partial(
        _normalise, norm=noted.norm, autocast=noted.autocast, dtype=saved.dtype, shape=saved.shape
    )  # not `saved` itself: the recipe must not keep it alive
    return recipe_for_view(saved, x, rebuild)


def _normalise(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    autocast: tuple[bool, torch.dtype],
    dtype: torch.dtype,
    shape: torch.Size,
) -> torch.Tensor:
    enabled, autocast_dtype = autocast
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=enabled):
        y = norm.forward(x)  # forward's computation, without the hooks
    return y.to(dtype).reshape(shape)
