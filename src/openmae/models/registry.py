"""Named model sizes: `create_model("mae_vit_base_patch16", **overrides)`, `list_models()`."""

from __future__ import annotations

import difflib
from dataclasses import fields, replace

from openmae.models.mae import MAEConfig, MaskedAutoencoder, build_mae

# The paper's decoder (512 wide, 8 deep, 16 heads) is MAEConfig's default.
_MODELS: dict[str, MAEConfig] = {
    # ImageNet sizes.
    "mae_vit_tiny_patch16": MAEConfig(embed_dim=192, depth=12, num_heads=3),
    "mae_vit_small_patch16": MAEConfig(embed_dim=384, depth=12, num_heads=6),
    "mae_vit_base_patch16": MAEConfig(embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": MAEConfig(embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # Small images on a CPU: 32x32 colour (CIFAR-like) and 28x28 grayscale (Fashion-MNIST).
    "mae_vit_tiny_patch4_32": MAEConfig(
        img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
    ),
    "mae_vit_tiny_patch4_28": MAEConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
    ),
    "mae_vit_mini_patch4_28": MAEConfig(
        img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    ),
    # For tests: a few thousand parameters.
    "mae_vit_debug": MAEConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    ),
}  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def model_config(name: str, **overrides) -> MAEConfig:
    """The config of a named size with some fields changed; unknown names and fields are errors."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}{_did_you_mean(name, _MODELS)}; see openmae.list_models()")
    known = {f.name for f in fields(MAEConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown model option {key!r}{_did_you_mean(key, known)}")
    return replace(_MODELS[name], **overrides)


def create_model(name: str, **overrides) -> MaskedAutoencoder:
    """Build a freshly initialised MAE of a named size, e.g. `create_model("mae_vit_debug", in_chans=4)`."""
    return build_mae(model_config(name, **overrides))


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
