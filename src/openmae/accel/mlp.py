"""A transformer MLP that does not keep its GELU output for backward (`accel.mlp=recompute`).

In `fc2(gelu(fc1(x)))` autograd keeps three activations of the hidden width `[B, N, 4D]`: fc1's
output h (GELU's backward needs it), GELU's output g (fc2's weight gradient needs it) and nothing
else of that size. g is a pure function of h, so this MLP keeps h only and computes g again when
fc2's backward asks for it: one more GELU per block in backward (an elementwise pass, about 1% of
a step) for a quarter of a block's activation memory (ViT-B/16 at batch 8: ~80 MB in bf16, ~160 MB
in fp32). The recomputed g is bit-identical to the forward one (the same kernel on the same h),
so losses and gradients do not change at all.

How: while fc2 runs, a rule of `openmae.accel.saved` stores any saved view of g as a recipe
(h, GELU and the view's geometry), and backward rebuilds the view from `gelu(h)`.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from openmae.accel.saved import Recipe, Rule, recipe_for_view, recipes

MLP_CHOICES = ("recompute", "plain")


class RecomputingMlp(nn.Module):
    """timm's `Mlp` (fc1, act, fc2; no dropout, no hidden norm) with g recomputed in backward.

    It holds the same submodules under the same names, so state dicts are unchanged.
    """

    def __init__(self, mlp: Mlp) -> None:
        super().__init__()
        if not recomputable(mlp):
            raise ValueError("RecomputingMlp needs an Mlp without dropout or a hidden norm")
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        h = self.fc1(x)  # [B, N, hidden]
        g = self.act(h)  # [B, N, hidden]
        if not (torch.is_grad_enabled() and g.requires_grad):
            return self.fc2(g)
        with recipes(_views_of(g, h, self.act)):
            return self.fc2(g)


def _views_of(g: torch.Tensor, h: torch.Tensor, act: nn.Module) -> Rule:
    """A rule for views of `g = act(h)`. It holds g's address, not g: backward keeps the rule's
    recipes, and g must be free to go."""
    g_storage, g_dtype = g.untyped_storage().data_ptr(), g.dtype

    def rule(saved: torch.Tensor) -> Recipe | None:
        if saved.untyped_storage().data_ptr() == g_storage and saved.dtype == g_dtype:
            return recipe_for_view(saved, h, act)
        return None

    return rule


def recomputable(mlp: nn.Module) -> bool:
    """Whether `mlp` is a timm `Mlp` whose forward is `fc2(act(fc1(x)))` exactly."""
    if type(mlp) is not Mlp:
        return False
    identities = (mlp.drop1, mlp.norm, mlp.drop2)
    dropout_free = all(isinstance(m, nn.Identity) or getattr(m, "p", 1.0) == 0.0 for m in identities)
    return dropout_free and isinstance(mlp.act, nn.GELU)


def recompute_mlps(model: nn.Module) -> int:
    """Replace every recomputable `Mlp` of `model` by a `RecomputingMlp`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if recomputable(child):
                setattr(parent, name, RecomputingMlp(child))
                replaced += 1
    return replaced
