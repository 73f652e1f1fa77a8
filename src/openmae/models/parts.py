"""The parts of an openmae model, read off its parameter names.

openmae's parameter names are the MAE reference's, and its encoder names are timm's. A state dict
splits into: the encoder proper (patch embedding, tokens, positions, blocks), its final norm (`norm`,
or `fc_norm` with average pooling), the classifier `head`, and the pretraining decoder (`decoder_*`
and the mask tokens). Export to timm keeps all but the decoder; loading a checkpoint is strict on the
encoder and initialises a part the checkpoint lacks.
"""

from __future__ import annotations

ENCODER = "encoder"
FINAL_NORM = "final norm"
HEAD = "head"
DECODER = "decoder"


def part_of(key: str) -> str:
    """Which part of an openmae model a parameter name belongs to."""
    if key.startswith("decoder_") or key in ("mask_token", "encoder_mask_token"):
        return DECODER
    if key.startswith("head."):
        return HEAD
    if key.startswith(("norm.", "fc_norm.")):
        return FINAL_NORM
    return ENCODER
