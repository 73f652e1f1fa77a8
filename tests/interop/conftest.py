"""Tiny random models for the interop tests (nothing downloaded, all on CPU)."""

from __future__ import annotations

import pytest
import torch

from openmae.models import MAEConfig, MaskedAutoencoder, VisionTransformer, ViTConfig

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_DECODER = {"decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def perturb(model: torch.nn.Module, seed: int = 0, keep_positions: bool = False) -> torch.nn.Module:
    """Add noise to every weight, so that zero biases, unit norms or a swapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if keep_positions and name.endswith("pos_embed"):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def make_mae():
    """`make_mae(**overrides)`: a tiny MaskedAutoencoder with perturbed weights."""

    def make(seed: int = 0, keep_positions: bool = False, **overrides) -> MaskedAutoencoder:
        torch.manual_seed(seed)
        model = MaskedAutoencoder(MAEConfig(**{**TINY, **TINY_DECODER, **overrides}))
        return perturb(model, seed, keep_positions)

    return make


@pytest.fixture
def make_vit():
    """`make_vit(**overrides)`: a tiny VisionTransformer (e.g. a classifier) with perturbed weights."""

    def make(seed: int = 0, **overrides) -> VisionTransformer:
        torch.manual_seed(seed)
        return perturb(VisionTransformer(ViTConfig(**{**TINY, **overrides})), seed)

    return make


@pytest.fixture
def same_weights():
    """`same_weights(a, b)`: True if two models (or state dicts) hold the same names and tensors."""

    def same(a, b) -> bool:
        sa = a if isinstance(a, dict) else a.state_dict()
        sb = b if isinstance(b, dict) else b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    return same
