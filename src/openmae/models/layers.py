"""Transformer building blocks with timm's parameter names.

Attention and Block keep the exact parameter names of timm's VisionTransformer
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so that weights move between
openmae, timm and the MAE reference without renaming. The MLP, drop path and patch embedding
are timm's own.
"""

from __future__ import annotations

from functools import cache, partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # [B, N, 3, heads, head_dim]
        # Split on the "3" axis, then move heads forward. In backward the three gradients are then
        # stacked straight into qkv's layout: one copy, where permuting first costs a second one.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x [B, heads, N, head_dim]
        x = attention(q, k, v)  # [B, heads, N, head_dim]
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` over `[B, heads, N, head_dim]`, by the fastest path for
    the device and dtype.

    SDPA everywhere, except bf16/fp16 on a CPU without matrix units for that type: there SDPA's
    low-precision kernel runs 1.3-5x slower than its fp32 one, so attention runs in fp32 on widened
    (exact) copies and only the low-precision tensors are kept for backward (`WidenedCpuAttention`).
    """
    if _slow_low_precision_cpu(q):
        return WidenedCpuAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class WidenedCpuAttention(torch.autograd.Function):
    """Low-precision `[B, heads, N, head_dim]` attention computed by the fp32 CPU flash kernels.

    Forward widens q, k, v, runs the fp32 kernel and rounds the output back. For backward it keeps
    q, k, v and the output in their low precision (plus the fp32 log-sum-exp, `[B, heads, N]`) and
    widens them again there: the activation memory of a low-precision run, where widening before
    SDPA would keep four fp32 copies per block alive until backward.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.float(), k.float(), v.float()
            )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, logsumexp = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, False
            )
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))


def _slow_low_precision_cpu(x: torch.Tensor) -> bool:
    low_precision = x.dtype in (torch.bfloat16, torch.float16)
    return low_precision and x.device.type == "cpu" and not cpu_has_matrix_units(x.dtype)


@cache
def cpu_has_matrix_units(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native `dtype` kernels on this CPU (bf16: AVX512-BF16/AMX; fp16: AVX512-FP16)."""
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, N, D]
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """Reference initialisation: xavier-uniform linears with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
