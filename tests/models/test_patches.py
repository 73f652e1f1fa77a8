"""patchify / unpatchify: round trips, the (row, column, channel) pixel order, per-patch normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from openmae.models.patches import denormalize_patches, normalize_patches, patchify, unpatchify


def coded_image(C: int, H: int, W: int) -> torch.Tensor:
    """`[1, C, H, W]` whose pixel at (c, y, x) holds the number c*10000 + y*100 + x."""
    c = torch.arange(C).view(C, 1, 1)
    y = torch.arange(H).view(1, H, 1)
    x = torch.arange(W).view(1, 1, W)
    return (c * 10000 + y * 100 + x).double()[None]


@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("H, W, P", [(32, 32, 8), (32, 48, 8), (32, 48, 16), (48, 32, 16), (16, 16, 16)])
def test_round_trip(C: int, H: int, W: int, P: int) -> None:
    imgs = torch.randn(2, C, H, W)
    patches = patchify(imgs, P)
    h, w = H // P, W // P
    assert patches.shape == (2, h * w, P * P * C)
    assert torch.equal(unpatchify(patches, P, (h, w)), imgs)
    # And the other way round: any [B, L, P*P*C] tensor is a valid patch sequence.
    assert torch.equal(patchify(unpatchify(patches, P, (h, w)), P), patches)


@pytest.mark.parametrize("C, H, W, P", [(1, 16, 24, 8), (3, 32, 48, 16), (4, 16, 16, 4)])
def test_pixel_order_is_row_column_channel_and_grid_is_row_major(C: int, H: int, W: int, P: int) -> None:
    patches = patchify(coded_image(C, H, W), P)[0]  # [L, P*P*C]
    w = W // P
    for n in range(patches.shape[0]):
        gy, gx = divmod(n, w)  # row-major grid
        expected = [
            c * 10000 + (gy * P + r) * 100 + (gx * P + s)
            for r in range(P)  # row inside the patch varies slowest
            for s in range(P)
            for c in range(C)  # channel varies fastest
        ]
        assert patches[n].tolist() == expected


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 8)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 32, 36), 8)
    patches = torch.zeros(1, 6, 8 * 8 * 3)
    with pytest.raises(ValueError):
        unpatchify(patches, 8, (2, 2))  # 4 cells for 6 patches
    with pytest.raises(ValueError):
        unpatchify(torch.zeros(1, 6, 8 * 8 * 3 + 1), 8, (2, 3))  # not a whole number of channels
    assert unpatchify(patches, 8, (2, 3)).shape == (1, 3, 16, 24)
    assert unpatchify(patches, 8, (3, 2)).shape == (1, 3, 24, 16)


def test_normalize_patches_matches_hand_computation() -> None:
    patches = torch.rand(2, 3, 12, dtype=torch.float64) * 5
    patches[0, 0] = 7.0  # a flat patch: variance 0, divided by sqrt(eps) only
    normed = normalize_patches(patches)
    for b in range(2):
        for n in range(3):
            values = patches[b, n].tolist()
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased
            expected = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            assert normed[b, n].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert torch.equal(normed[0, 0], torch.zeros(12, dtype=torch.float64))


def test_denormalize_inverts_normalize() -> None:
    patches = torch.rand(2, 5, 48, dtype=torch.float64)
    back = denormalize_patches(normalize_patches(patches), patches)
    torch.testing.assert_close(back, patches)
