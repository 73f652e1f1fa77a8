"""State-dict helpers shared by every format: unwrapping, prefixes, checks (the parts of a model,
which loading treats one by one, are `openmae.models.parts`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def square_grid(num_patches: int, what: str = "pos_embed") -> tuple[int, int]:
    """`(s, s)` with `s * s == num_patches`, or a ValueError: a flat table does not say its grid."""
    side = round(num_patches**0.5)
    if side * side != num_patches:
        raise ValueError(
            f"cannot tell the grid of a {what} with {num_patches} patches (not a square); "
            "pass the checkpoint's image size (img_size=) when it matches the checkpoint"
        )
    return side, side
