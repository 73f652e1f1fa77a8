"""The residual stream in the autocast dtype instead of fp32 (opt-in: `accel.residual=lowp`).

Under autocast a ViT's residual stream is fp32: the position embeddings are fp32 parameters, so
`tokens + pos_embed` is fp32, and each block then reads it in fp32 for its layer norms, rounds the
normalised values to bf16 for the matrix products, and adds the products' bf16 outputs back in
fp32; backward does the same in reverse. With `lowp` every transformer block rounds its input to
the autocast dtype, so the stream, the layer norms (statistics still summed in fp32 inside torch's
kernel) and the residual adds run in bf16: half the bytes, no casts, and half the memory the layer
norms keep for backward. Megatron-LM trains so by default (`fp32_residual_connection=False`).

The price is one rounding of the stream per residual add (relative 2^-9 in bf16), so results are
no longer those of plain autocast; that is why it is a switch, off by default, and not a
measured choice. Nothing changes in fp32 or outside autocast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from openmae.models.layers import Block

RESIDUAL_CHOICES = ("fp32", "lowp")


def lowp_residual(model: nn.Module) -> list[RemovableHandle]:
    """Make every openmae `Block` of `model` take its input in the autocast dtype; returns the hooks."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return [block.register_forward_pre_hook(_to_autocast_dtype) for block in blocks]


def _to_autocast_dtype(block: Block, args: tuple) -> tuple | None:
    x = args[0]  # [B, N, D]
    device_type = x.device.type
    if not (torch.is_autocast_enabled(device_type) and x.is_floating_point()):
        return None
    return (x.to(torch.get_autocast_dtype(device_type)), *args[1:])
