"""Transformer building blocks with timm's parameter names.

Attention and Block keep the exact parameter names of timm's VisionTransformer
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so that weights move between
openmae, timm and the MAE reference without renaming. The MLP, drop path and patch embedding
are timm's own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention: `[B, N, D]` -> `[B, N, D]`.

    The product itself is `kernel`, a function of the packed qkv `[B, N, 3, heads, head_dim]` that
    returns `[B, N, heads, head_dim]`: `sdpa_attention` here. `openmae.accel` may set a faster one
    for the device, dtype and sequence length a run meets; each gives the same result.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.kernel: Callable[[torch.Tensor], torch.Tensor] = sdpa_attention

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, N, D]` -> `[B, N, D]`, or with `rows` (`[B, M]` token indices) the output at those
        tokens alone, `[B, M, D]`: every token is still attended to, the projection runs on M rows."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # [B, N, 3, heads, head_dim]
        x = self.kernel(qkv).reshape(B, N, D)  # [B, N, D]
        if rows is not None:
            x = take_tokens(x, rows)  # [B, M, D]
        return self.proj(x)


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` per head: packed `[B, N, 3, heads, head_dim]` ->
    `[B, N, heads, head_dim]`, by torch's `scaled_dot_product_attention`."""
    q, k, v = split_heads(qkv)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed `[B, N, 3, heads, head_dim]` -> q, k, v, each `[B, heads, N, head_dim]` (views)."""
    # Split on the "3" axis, then move heads forward: in backward the three gradients are then
    # stacked straight into qkv's layout (one copy; permuting qkv first would cost a second one).
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, N, D]` -> `[B, N, D]`, or with `rows` (`[B, M]` token indices) the output at those
        tokens alone, `[B, M, D]`: attention reads all N tokens, the MLP runs on M rows."""
        shortcut = x if rows is None else take_tokens(x, rows)  # [B, N or M, D]
        x = shortcut + self.drop_path1(self.attn(self.norm1(x), rows))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def take_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`[B, N, D]` tokens, `[B, M]` indices -> `[B, M, D]`: row `ids[b, m]` of sample b."""
    return torch.gather(x, dim=1, index=ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def init_weights(module: nn.Module) -> None:
    """Reference initialisation: xavier-uniform linears with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
