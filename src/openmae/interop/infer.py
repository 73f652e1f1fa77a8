"""Reading a model's architecture off the shapes of its weights (openmae / reference / timm names).

Everything but the number of attention heads is in the shapes: width and patch size from the patch
projection `[D, C, P, P]`, depth from the block indices, MLP ratio from `fc1`, the grid from the
position table, classes from the head, average pooling from `fc_norm`, the decoder likewise. Heads
come from the standard ViT sizes, else `width // 64` (decoder: `width // 32`), with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection

import torch

from openmae.interop.state import square_grid

# Heads of the standard sizes (ViT-Ti/S/B/L/H and the MAE decoder): not stored in any checkpoint.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
STANDARD_DECODER_HEADS = {512: 16}


def guess_heads(width: int, standard: dict[int, int], per_head: int) -> int | None:
    """Heads of a standard width, else `width // per_head`; None when that does not divide the width."""
    if width in standard:
        return standard[width]
    heads = max(1, width // per_head)
    return heads if width % heads == 0 else None


def count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of blocks `prefix.<i>.*`; the indices must run 0..n-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"{prefix} indices are not contiguous: {sorted(indices)}")
    return len(indices)


def infer_grid(num_patches: int, hint: tuple[int, int] | None = None) -> tuple[int, int]:
    """The `(h, w)` grid of a position table: the hint if it has that many patches, else a square."""
    if hint is not None and hint[0] * hint[1] == num_patches:
        return tuple(hint)
    return square_grid(num_patches)


def mlp_ratio_of(state: dict[str, torch.Tensor], prefix: str, width: int) -> float:
    hidden = state[f"{prefix}.0.mlp.fc1.weight"].shape[0]
    ratio = hidden / width
    # timm sizes the MLP as int(width * ratio); make sure float rounding cannot lose a unit.
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def infer_config(
    state: dict[str, torch.Tensor],
    img_size: int | tuple[int, int] | None = None,
    given: Collection[str] = (),
) -> dict:
    """Config fields (of `MAEConfig` / `ViTConfig`) that fit a state dict in openmae's names.

    Args:
        state: weights named like openmae / the MAE reference / timm.
        img_size: the checkpoint's image size, needed only for a non-square grid.
        given: fields the caller sets anyway; no guess (or warning) is made for them.

    Returns:
        A dict with the encoder fields, `num_classes` and `global_pool`, plus the decoder fields and
        `encoder_mask_tokens` when the checkpoint has a decoder.
    """
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(
            "cannot infer the architecture: no patch_embed.proj.weight / pos_embed in the checkpoint"
        )
    D, C, P, P2 = state["patch_embed.proj.weight"].shape  # [D, C, P, P]
    if P != P2:
        raise ValueError(f"non-square patches {P}x{P2} are not supported")
    depth = count_layers(state, "blocks")
    if depth == 0:
        raise ValueError("cannot infer the architecture: the checkpoint has no blocks.<i> weights")
    hint = None if img_size is None else _grid_of(img_size, P)
    h, w = infer_grid(state["pos_embed"].shape[1] - 1, hint)  # one prefix token (cls)
    fields = {
        "img_size": (h * P, w * P),
        "patch_size": P,
        "in_chans": C,
        "embed_dim": D,
        "depth": depth,
        "mlp_ratio": mlp_ratio_of(state, "blocks", D),
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "global_pool": "avg" if "fc_norm.weight" in state else "token",
    }
    if "num_heads" not in given:
        fields["num_heads"] = _heads("num_heads", D, STANDARD_HEADS, 64)
    if "decoder_embed.weight" in state:
        fields.update(_infer_decoder(state, fields, given))
    return fields


def _infer_decoder(state: dict[str, torch.Tensor], encoder: dict, given: Collection[str]) -> dict:
    Dd = state["decoder_embed.weight"].shape[0]  # [Dd, D]
    depth = count_layers(state, "decoder_blocks")
    if depth and mlp_ratio_of(state, "decoder_blocks", Dd) != encoder["mlp_ratio"]:
        raise ValueError(
            "the decoder's MLP ratio differs from the encoder's; openmae uses one ratio for both"
        )
    P, C = encoder["patch_size"], encoder["in_chans"]
    pred = state.get("decoder_pred.weight")
    if pred is not None and pred.shape[0] != P * P * C:
        raise ValueError(
            f"decoder_pred predicts {pred.shape[0]} values per patch, expected P*P*C = {P * P * C}"
        )
    fields = {
        "decoder_embed_dim": Dd,
        "decoder_depth": depth,
        "encoder_mask_tokens": "encoder_mask_token" in state,
    }
    if "decoder_num_heads" not in given:
        fields["decoder_num_heads"] = _heads("decoder_num_heads", Dd, STANDARD_DECODER_HEADS, 32)
    return fields


def _heads(field: str, width: int, standard: dict[int, int], per_head: int) -> int:
    heads = guess_heads(width, standard, per_head)
    if heads is None:
        raise ValueError(
            f"{field} is not stored in checkpoints and no guess divides width {width}; pass {field}="
        )
    if width not in standard:
        warnings.warn(
            f"{field} is not stored in checkpoints; guessed {heads} for the non-standard width {width} "
            f"(pass {field}= to set it)",
            stacklevel=4,
        )
    return heads


def _grid_of(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    return H // patch_size, W // patch_size
