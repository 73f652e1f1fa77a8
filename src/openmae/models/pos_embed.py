"""Fixed 2-D sine-cosine position embeddings, and resizing of learned ones.

Layout as in the MAE reference: the first half of the channels encodes the column (x)
coordinate, the second half the row (y); in each half, sin then cos; frequencies
`1 / 10000^(2i/d)`. A zero row stands in front for the cls token.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """`[N]` positions -> `[N, embed_dim]`: sin on the first half of channels, cos on the second."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [N, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Position embedding for an `h x w` grid in row-major order.

    Returns `[1 + h*w, embed_dim]` (a zero first row for the cls token) or `[h*w, embed_dim]`,
    as float32.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # [h, w] each
    emb_x = sincos_1d(embed_dim // 2, cols.reshape(-1))  # [h*w, D/2]
    emb_y = sincos_1d(embed_dim // 2, rows.reshape(-1))  # [h*w, D/2]
    emb = torch.cat([emb_x, emb_y], dim=1)  # [h*w, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a `[1, prefix + h*w, D]` position embedding to a new (possibly rectangular) grid.

    A fixed sin-cos table is recomputed exactly for the new grid; anything else (a fine-tuned,
    learned embedding) is resampled bicubically with timm's `resample_abs_pos_embed`.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    if num_prefix_tokens == 1 and dim % 4 == 0:
        expected = sincos_2d(dim, old_grid).to(pos_embed)
        if torch.allclose(pos_embed[0], expected, atol=1e-5):
            return sincos_2d(dim, new_grid)[None].to(pos_embed)
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=num_prefix_tokens,
        verbose=False,
    )
