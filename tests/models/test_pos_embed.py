"""2-D sin-cos position embedding against the formula, and resizing to new grids."""

from __future__ import annotations

import math

import pytest
import torch

from openmae.models.pos_embed import resize_pos_embed, sincos_2d


def formula(d: int, h: int, w: int) -> list[list[float]]:
    """The MAE table written out: a zero cls row, then one row per patch in row-major order.

    Each row is [sin(x w_i) for i, cos(x w_i) for i, sin(y w_i) for i, cos(y w_i) for i] with
    x the column, y the row and w_i = 1 / 10000^(i / (d/4)) for i < d/4: every half of d/2
    channels is a 1-D embedding whose frequencies are 1 / 10000^(2i / (d/2)).
    """
    quarter = d // 4
    omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    table = [[0.0] * d]
    for y in range(h):
        for x in range(w):
            row = []
            for coord in (x, y):
                row += [math.sin(coord * om) for om in omegas]
                row += [math.cos(coord * om) for om in omegas]
            table.append(row)
    return table


@pytest.mark.parametrize("d, grid", [(16, (3, 5)), (32, (4, 4)), (8, (5, 3)), (64, (2, 7)), (4, (1, 1))])
def test_sincos_2d_matches_formula(d: int, grid: tuple[int, int]) -> None:
    table = sincos_2d(d, grid)
    assert table.shape == (1 + grid[0] * grid[1], d)
    assert table.dtype == torch.float32
    expected = torch.tensor(formula(d, *grid), dtype=torch.float32)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    assert torch.equal(table[0], torch.zeros(d))  # the cls row


def test_sincos_2d_without_cls_row_and_channel_halves() -> None:
    d, (h, w) = 16, (3, 5)
    table = sincos_2d(d, (h, w), cls_token=False)  # [h*w, d]
    assert torch.equal(table, sincos_2d(d, (h, w))[1:])
    grid = table.view(h, w, d)
    # First half depends on the column only, second half on the row only.
    assert torch.equal(grid[:, :, : d // 2], grid[:1, :, : d // 2].expand(h, w, d // 2))
    assert torch.equal(grid[:, :, d // 2 :], grid[:, :1, d // 2 :].expand(h, w, d // 2))
    # Position (0, 0): sin 0 = 0 then cos 0 = 1 in each half.
    quarter = torch.cat([torch.zeros(d // 4), torch.ones(d // 4)])
    assert torch.equal(table[0], torch.cat([quarter, quarter]))


def test_sincos_2d_needs_width_divisible_by_4() -> None:
    with pytest.raises(ValueError):
        sincos_2d(18, (2, 2))


def test_resize_recomputes_sincos_exactly_on_a_rectangular_grid() -> None:
    d = 32
    old = sincos_2d(d, (4, 4))[None]  # [1, 17, d]
    new = resize_pos_embed(old, (4, 4), (3, 5))
    assert torch.equal(new, sincos_2d(d, (3, 5))[None])
    assert torch.equal(resize_pos_embed(new, (3, 5), (6, 2)), sincos_2d(d, (6, 2))[None])
    assert resize_pos_embed(old, (4, 4), (4, 4)) is old


def test_resize_resamples_a_learned_embedding() -> None:
    d = 32
    learned = torch.randn(1, 1 + 4 * 4, d, generator=torch.Generator().manual_seed(0))
    new = resize_pos_embed(learned, (4, 4), (3, 5))
    assert new.shape == (1, 1 + 3 * 5, d)
    assert torch.equal(new[:, 0], learned[:, 0])  # the cls position is carried over untouched
    assert not torch.allclose(new, sincos_2d(d, (3, 5))[None], atol=1e-2)  # not mistaken for sin-cos
    # Bicubic resampling keeps a constant field constant.
    constant = torch.full((1, 1 + 4 * 4, d), 0.5)
    torch.testing.assert_close(resize_pos_embed(constant, (4, 4), (6, 2)), torch.full((1, 13, d), 0.5))
