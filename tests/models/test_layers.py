"""Transformer blocks: a block's output at chosen token rows is the full output at those rows."""

from __future__ import annotations

import pytest
import torch

from openmae.models.layers import Block, take_tokens


def test_take_tokens_picks_each_samples_rows() -> None:
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B, N, D]
    ids = torch.tensor([[3, 0], [1, 1]])
    assert torch.equal(take_tokens(x, ids), torch.stack([x[0, [3, 0]], x[1, [1, 1]]]))


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_a_block_at_some_rows_gives_the_full_output_and_gradients_there(drop_path: float) -> None:
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, drop_path=drop_path).train()
    x = torch.randn(3, 10, 32, requires_grad=True)  # [B, N, D]
    rows = torch.stack([torch.randperm(10)[:6] for _ in range(3)])  # [B, M]
    upstream = torch.randn(3, 6, 32)

    torch.manual_seed(1)  # the same drop-path draws for both
    full = take_tokens(block(x), rows)
    (full_grad,) = torch.autograd.grad((full * upstream).sum(), x)
    torch.manual_seed(1)
    part = block(x, rows)
    (part_grad,) = torch.autograd.grad((part * upstream).sum(), x)

    assert part.shape == (3, 6, 32)
    torch.testing.assert_close(part, full)
    torch.testing.assert_close(part_grad, full_grad)
    assert part_grad.abs().sum() > 0  # the other tokens still reach the chosen rows through attention
