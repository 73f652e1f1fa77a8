"""Transformer building blocks with timm's parameter names.

Attention and Block keep the exact parameter names of timm's VisionTransformer
(`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) so that weights move between
openmae, timm and the MAE reference without renaming. The MLP, drop path and patch embedding
are timm's own.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from openmae import hardware

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention; `attention` picks the kernel (SDPA, or a faster one on CPU)."""

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
        x = attention(qkv)  # [B, N, heads, head_dim]
        return self.proj(x.reshape(B, N, D))


# Up to this many tokens, torch's CPU flash-attention kernels spend more time on their tiling than
# on the products: direct matrix products run forward + backward 1.2-2x faster (measured on
# 17-129 tokens, head widths 32 and 64). Longer sequences go to the flash kernels.
SHORT_SEQUENCE = 128


def attention(qkv: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` per head: packed `[B, N, 3, heads, head_dim]` ->
    `[B, N, heads, head_dim]`, by the fastest path for the device, dtype and length
    (see `attention_path`)."""
    path = attention_path(qkv)
    if path == "short":
        return ShortCpuAttention.apply(qkv)
    # Split on the "3" axis, then move heads forward. In backward the three gradients are then
    # stacked straight into qkv's layout: one copy, where permuting first costs a second one.
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x [B, heads, N, head_dim]
    if path == "widened":
        out = WidenedCpuAttention.apply(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)  # [B, N, heads, head_dim]


def attention_path(qkv: torch.Tensor) -> str:
    """Which kernel `attention` uses for a packed `[B, N, 3, heads, head_dim]` input.

    - "short": a CPU sequence of at most `SHORT_SEQUENCE` tokens in fp32, or in a low precision
      without matrix units: plain fp32 matrix products (`ShortCpuAttention`).
    - "widened": a longer low-precision CPU sequence without matrix units for its type, where
      SDPA's low-precision kernel runs 1.3-5x slower than its fp32 one: the fp32 flash kernels
      on widened copies (`WidenedCpuAttention`).
    - "sdpa": everything else, GPUs included.
    """
    if qkv.device.type != "cpu":
        return "sdpa"
    slow_low_precision = _slow_low_precision_cpu(qkv)
    if qkv.shape[1] <= SHORT_SEQUENCE and (qkv.dtype == torch.float32 or slow_low_precision):
        return "short"
    return "widened" if slow_low_precision else "sdpa"


class ShortCpuAttention(torch.autograd.Function):
    """Attention over a short CPU sequence as plain matrix products, one head at a time:
    packed qkv `[B, N, 3, heads, head_dim]` -> `[B, N, heads, head_dim]`.

    Each head's q, k and v are strided views of qkv that the batched products read in place, so
    nothing is permuted or copied on the way in, and the heads' outputs are stacked straight into
    the layout the output projection reads. For backward it keeps qkv (in its dtype) and the
    attention probabilities `[B, N, N]` per head; the flash kernels keep the output and the
    log-sum-exp instead, which is more for N <= head_dim. Low-precision inputs are widened to fp32
    (exactly) for the products and the softmax; results are rounded back once.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor) -> torch.Tensor:
        scale = qkv.shape[-1] ** -0.5
        probs, outs = [], []
        with torch.autocast("cpu", enabled=False):
            for q, k, v in _heads(widened(qkv)):  # 3 x [B, N, head_dim]
                head_probs = torch.bmm(q, k.transpose(1, 2)).mul_(scale).softmax(-1)  # [B, N, N]
                outs.append(torch.bmm(head_probs, v))
                probs.append(head_probs.to(qkv.dtype))
        ctx.save_for_backward(qkv, *probs)
        return torch.stack(outs, dim=2).to(qkv.dtype)  # [B, N, heads, head_dim]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        qkv, *probs = ctx.saved_tensors
        scale = qkv.shape[-1] ** -0.5
        grad_out = widened(grad_out)  # [B, N, heads, head_dim]
        grad_q, grad_k, grad_v = [], [], []
        with torch.autocast("cpu", enabled=False):
            for h, (q, k, v) in enumerate(_heads(widened(qkv))):
                head_probs, grad = widened(probs[h]), grad_out[:, :, h]  # [B, N, N], [B, N, head_dim]
                grad_v.append(torch.bmm(head_probs.transpose(1, 2), grad))
                # Softmax backward in place, p * dp - p * sum_j(p_j dp_j); then the scale of q k^T.
                grad_scores = torch.bmm(grad, v.transpose(1, 2)).mul_(head_probs)  # [B, N, N]
                grad_scores.addcmul_(head_probs, grad_scores.sum(-1, keepdim=True), value=-1).mul_(scale)
                grad_q.append(torch.bmm(grad_scores, k))
                grad_k.append(torch.bmm(grad_scores.transpose(1, 2), q))
        grad_qkv = torch.stack(grad_q + grad_k + grad_v, dim=2)  # [B, N, 3 * heads, head_dim]
        return grad_qkv.view(qkv.shape).to(qkv.dtype)


def _heads(qkv: torch.Tensor):
    """Per head, its q, k, v `[B, N, head_dim]`: strided views of packed `[B, N, 3, heads, head_dim]`."""
    for h in range(qkv.shape[3]):
        yield qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]


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


_LOW_PRECISIONS = (torch.bfloat16, torch.float16)


def widened(x: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 tensor as fp32 (exact); any other tensor as it is."""
    return x.float() if x.dtype in _LOW_PRECISIONS else x


def _slow_low_precision_cpu(x: torch.Tensor) -> bool:
    on_cpu = x.dtype in _LOW_PRECISIONS and x.device.type == "cpu"
    return on_cpu and not hardware.cpu_has_matrix_units(x.dtype)


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
