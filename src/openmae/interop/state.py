"""State-dict helpers shared by every format: unwrapping, prefixes, and the parts of a model.

openmae's parameter names are the MAE reference's, and its encoder names are timm's. A state dict
in those names splits into parts: the encoder proper (patch embedding, tokens, positions, blocks),
its final norm (`norm`, or `fc_norm` with average pooling), the classifier `head`, and the
pretraining decoder (`decoder_*` and the mask tokens). Loading is strict on the encoder; a part the
checkpoint lacks is freshly initialised with a warning (e.g. the decoder of an encoder-only
checkpoint, the head of a pretrained one), a part the model lacks is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

ENCODER = "encoder"
FINAL_NORM = "final norm"
HEAD = "head"
DECODER = "decoder"

# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    for name in ("_orig_mod", "module"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    return model


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` / `_orig_mod.` from the front of keys (saved from a wrapped model)."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def check_tensors(state: Mapping, origin: str) -> dict[str, torch.Tensor]:
    """A plain `{name: tensor}` dict, or a ValueError naming what is not one."""
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{origin}: expected a non-empty state dict of tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{origin}: not a state dict of tensors (entries {bad[:5]} are not tensors)")
    return dict(state)


def part_of(key: str) -> str:
    """Which part of an openmae model a parameter name belongs to (see the module docstring)."""
    if key.startswith("decoder_") or key in ("mask_token", "encoder_mask_token"):
        return DECODER
    if key.startswith("head."):
        return HEAD
    if key.startswith(("norm.", "fc_norm.")):
        return FINAL_NORM
    return ENCODER


def square_grid(num_patches: int, what: str = "pos_embed") -> tuple[int, int]:
    """`(s, s)` with `s * s == num_patches`, or a ValueError: a flat table does not say its grid."""
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(
            f"cannot tell the grid of a {what} with {num_patches} patches (not a square); "
            "pass the checkpoint's image size (img_size=) when it matches the checkpoint"
        )
    return side, side
