"""Masking: counts, reproducibility, the inverse permutation, block / grid / user masks."""

from __future__ import annotations

import pytest
import torch

from openmae.models import create_model
from openmae.models.masking import (
    Masking,
    grid_mask,
    masking_from_mask,
    random_masking,
    sample_masking,
)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def check_consistent(masking: Masking, L: int, K: int) -> None:
    """ids_keep, ids_restore and mask describe the same choice of K kept patches out of L."""
    B = masking.mask.shape[0]
    assert masking.ids_keep.shape == (B, K)
    assert masking.ids_restore.shape == (B, L)
    assert masking.mask.shape == (B, L)
    assert torch.equal(masking.mask.sum(dim=1), torch.full((B,), float(L - K)))
    # ids_restore is a permutation, and its inverse (the shuffle) starts with ids_keep.
    assert torch.equal(masking.ids_restore.sort(dim=1).values, torch.arange(L).expand(B, L))
    ids_shuffle = torch.argsort(masking.ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :K], masking.ids_keep)
    # Undoing the shuffle: gathering the shuffled positions with ids_restore gives the grid order.
    assert torch.equal(torch.gather(ids_shuffle, 1, masking.ids_restore), torch.arange(L).expand(B, L))
    # The mask was built as [0]*K + [1]*(L-K) in shuffled order, then un-shuffled.
    assert torch.equal(masking.mask, (masking.ids_restore >= K).float())
    assert bool((torch.gather(masking.mask, 1, masking.ids_keep) == 0).all())


@pytest.mark.parametrize(
    "L, ratio, K",
    [(16, 0.75, 4), (196, 0.75, 49), (49, 0.75, 12), (16, 0.5, 8), (10, 0.25, 7), (16, 0.0, 16)]
    + [(196, 0.9, 19)]
    # int() truncates a float product, as the reference does: 50 * (1 - 0.9) = 4.999... keeps 4.
    + [(50, 0.9, 4)],
)
def test_random_masking_keeps_int_L_times_1_minus_ratio(L: int, ratio: float, K: int) -> None:
    noise = rand(5, L)
    masking = random_masking(noise, ratio)
    assert masking.ids_keep.shape[1] == K
    check_consistent(masking, L, K)


def test_random_masking_keeps_the_smallest_noise_in_ascending_order() -> None:
    noise = rand(3, 16)
    masking = random_masking(noise, 0.75)
    for b in range(3):
        order = sorted(range(16), key=lambda i: noise[b, i].item())
        assert masking.ids_keep[b].tolist() == order[:4]


def test_fixed_noise_gives_identical_masks_and_random_rows_differ() -> None:
    noise = rand(8, 49)
    first, second = random_masking(noise, 0.75), random_masking(noise.clone(), 0.75)
    assert torch.equal(first.mask, second.mask)
    assert torch.equal(first.ids_restore, second.ids_restore)
    assert len({tuple(row.tolist()) for row in first.mask}) == 8
    # Through the sampler: a seeded generator reproduces the draw, another seed does not.
    draw = lambda seed: sample_masking(4, (7, 7), 0.75, generator=torch.Generator().manual_seed(seed)).mask
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_bad_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(rand(2, 16), ratio)


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (8, 12)])
def test_grid_mask_075_keeps_one_patch_per_2x2_cell(grid: tuple[int, int]) -> None:
    h, w = grid
    masking = sample_masking(3, grid, 0.75, sampling="grid")
    L = h * w
    check_consistent(masking, L, L // 4)
    assert masking.mask.mean().item() == 0.75
    kept = (masking.mask[0] == 0).view(h, w)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[::2, ::2] = True
    assert torch.equal(kept, expected)


def test_grid_mask_with_irregular_ratio_raises() -> None:
    for ratio in (0.5, 0.7, 0.8):
        with pytest.raises(ValueError, match="grid"):
            grid_mask((4, 4), ratio)
    assert grid_mask((6, 6), 1 - 1 / 9).sum().item() == 32  # stride 3: 4 of 36 kept
    assert grid_mask((4, 4), 0.0).sum().item() == 0


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.4])
def test_block_mask_hides_exactly_the_ratio_in_blocks(ratio: float) -> None:
    grid, B = (14, 14), 4
    L = 196
    K = int(L * (1 - ratio))
    gen = lambda: torch.Generator().manual_seed(0)
    masking = sample_masking(B, grid, ratio, sampling="block", generator=gen())
    check_consistent(masking, L, K)
    assert torch.equal(masking.mask, sample_masking(B, grid, ratio, sampling="block", generator=gen()).mask)
    assert len({tuple(row.tolist()) for row in masking.mask}) == B
    # Blocks, not scattered patches: hidden patches have far more hidden neighbours than random ones.
    hidden = masking.mask.view(B, *grid)
    random_hidden = random_masking(rand(B, L), ratio).mask.view(B, *grid)
    assert same_neighbours(hidden) > same_neighbours(random_hidden) + 0.1


def same_neighbours(hidden: torch.Tensor) -> float:
    """Fraction of horizontally or vertically adjacent pairs of patches that share a state."""
    rows = (hidden[:, 1:, :] == hidden[:, :-1, :]).float().mean()
    cols = (hidden[:, :, 1:] == hidden[:, :, :-1]).float().mean()
    return ((rows + cols) / 2).item()


def test_user_mask_is_honoured() -> None:
    mask = torch.zeros(2, 16)
    mask[0, [0, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]] = 1
    mask[1, 4:] = 1
    masking = masking_from_mask(mask)
    check_consistent(masking, 16, 4)
    assert torch.equal(masking.mask, mask)
    assert masking.ids_keep.tolist() == [[1, 2, 4, 8], [0, 1, 2, 3]]  # visible patches in grid order
    model = create_model("mae_vit_debug")
    out = model(torch.randn(2, 3, 32, 32), mask=mask.bool())
    assert torch.equal(out.mask, mask)


def test_bad_user_masks_raise() -> None:
    unequal = torch.zeros(2, 16)
    unequal[0, :12] = 1
    unequal[1, :11] = 1
    with pytest.raises(ValueError, match="same number"):
        masking_from_mask(unequal)
    with pytest.raises(ValueError, match="same number"):
        create_model("mae_vit_debug")(torch.randn(2, 3, 32, 32), mask=unequal)
    with pytest.raises(ValueError, match="0"):
        masking_from_mask(torch.full((2, 16), 0.5))


def test_unknown_sampling_raises() -> None:
    with pytest.raises(ValueError, match="sampling"):
        sample_masking(2, (4, 4), 0.75, sampling="checkerboard")
