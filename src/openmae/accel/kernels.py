"""Attention kernels that can beat `scaled_dot_product_attention` on some devices and shapes.

Each takes the packed qkv `[B, N, 3, heads, head_dim]` that `Attention` computes and returns
`[B, N, heads, head_dim]`, the result of the plain path (`models.layers.sdpa_attention`) within
the dtype's rounding. Which one runs is measured, per shape, by `openmae.accel.attention`.

- `per_head`: plain batched products one head at a time (custom autograd). At the short sequences
  of MAE's encoder (17 tokens for ViT-B at 75% masking) the flash kernels spend more on tiling
  than on the products; here each head's q, k, v are strided views of qkv, read in place, and
  the outputs land straight in the layout the output projection reads.
- `per_head_fp32`: the same with low-precision inputs widened to fp32 (exactly) for the products
  and the softmax, for CPUs whose bf16 products have no matrix units.
- `eager`: the textbook expression in the input dtype (what HF's eager attention runs).
- `eager_lowp`: the same with the softmax read and written in the low precision. Torch's CPU
  softmax accumulates in fp32 inside, so the probabilities round once, as in `eager`, but the
  four fp32 copies of each score matrix (`[B, heads, N, N]`: widened for the softmax, rounded
  after it, and both again in backward) are never made. At the decoder's 65 tokens they were a
  quarter of a tiny bf16 step on an AMX CPU.
- `eager_recompute`: `eager_lowp`'s products and softmax without keeping the probabilities
  `[B, heads, N, N]` for backward: backward computes them again from q and k (one more product
  and softmax per block, bit-identical to forward's). The memory of the flash kernels, which keep
  only the output and log-sum-exp, at close to eager's speed; measured under `accel.attention=lean`,
  not under `auto`.
- `widened_flash`: torch's fp32 CPU flash kernels on widened copies of low-precision inputs,
  keeping the low-precision tensors for backward.
"""

from __future__ import annotations

import torch

from openmae.models.layers import split_heads

LOW_PRECISIONS = (torch.bfloat16, torch.float16)


def eager_attention(qkv: torch.Tensor) -> torch.Tensor:
    """`softmax(q k^T / sqrt(head_dim)) v` by autograd, in qkv's dtype (softmax in fp32)."""
    return _eager(qkv, fp32_softmax=True)


def eager_lowp_attention(qkv: torch.Tensor) -> torch.Tensor:
    """`eager_attention` with the softmax in qkv's dtype (fp32 accumulation inside torch's kernel)."""
    return _eager(qkv, fp32_softmax=False)


def _eager(qkv: torch.Tensor, fp32_softmax: bool) -> torch.Tensor:
    q, k, v = split_heads(qkv)  # 3 x [B, heads, N, head_dim]
    scores = _scores(q, k)  # [B, heads, N, N]
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype) if fp32_softmax else scores.softmax(-1)
    return (probs @ v).transpose(1, 2)  # [B, N, heads, head_dim]


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`q k^T / sqrt(head_dim)` in q's dtype: `[B, heads, N, N]`."""
    return (q @ k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)


def eager_recompute_attention(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = split_heads(qkv)  # 3 x [B, heads, N, head_dim]
    return RecomputedAttention.apply(q, k, v).transpose(1, 2)  # [B, N, heads, head_dim]


class RecomputedAttention(torch.autograd.Function):
    """`[B, heads, N, head_dim]` attention in the inputs' dtype that keeps only q, k, v for backward
    (views of the packed qkv, alive anyway) and computes the probabilities there again."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):  # backward runs in these dtypes too
            out = _scores(q, k).softmax(-1) @ v  # [B, heads, N, head_dim], as eager_lowp
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        probs = _scores(q, k).softmax(-1)  # [B, heads, N, N], as in forward
        grad_v = probs.transpose(-2, -1) @ grad_out
        grad_probs = grad_out @ v.transpose(-2, -1)  # [B, heads, N, N]
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_scores = grad_scores.mul_(q.shape[-1] ** -0.5)
        return grad_scores @ k, grad_scores.transpose(-2, -1) @ q, grad_v


def per_head_attention(qkv: torch.Tensor) -> torch.Tensor:
    return PerHeadAttention.apply(qkv, False)


def per_head_fp32_attention(qkv: torch.Tensor) -> torch.Tensor:
    return PerHeadAttention.apply(qkv, True)


class PerHeadAttention(torch.autograd.Function):
    """Attention as plain matrix products, one head at a time: `[B, N, 3, heads, head_dim]` ->
    `[B, N, heads, head_dim]`.

    For backward it keeps qkv (in its dtype) and the attention probabilities `[B, N, N]` per head;
    the flash kernels keep the output and the log-sum-exp instead, which is more for N <= head_dim.
    With `widen`, low-precision inputs are computed in fp32 and the results rounded back once.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, widen: bool) -> torch.Tensor:
        scale = qkv.shape[-1] ** -0.5
        compute = _widened(qkv) if widen else qkv
        probs, outs = [], []
        with torch.autocast(qkv.device.type, enabled=False):
            for q, k, v in _heads(compute):  # 3 x [B, N, head_dim]
                scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # [B, N, N]
                head_probs = scores.softmax(-1, dtype=torch.promote_types(compute.dtype, torch.float32))
                head_probs = head_probs.to(compute.dtype)
                outs.append(torch.bmm(head_probs, v))
                probs.append(head_probs.to(qkv.dtype))
        ctx.widen = widen
        ctx.save_for_backward(qkv, *probs)
        return torch.stack(outs, dim=2).to(qkv.dtype)  # [B, N, heads, head_dim]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, *probs = ctx.saved_tensors
        scale = qkv.shape[-1] ** -0.5
        compute = _widened(qkv) if ctx.widen else qkv
        grad_out = grad_out.to(compute.dtype)  # [B, N, heads, head_dim]
        grad_q, grad_k, grad_v = [], [], []
        with torch.autocast(qkv.device.type, enabled=False):
            for h, (q, k, v) in enumerate(_heads(compute)):
                head_probs, grad = probs[h].to(compute.dtype), grad_out[:, :, h]  # [B, N, N], [B, N, hd]
                grad_v.append(torch.bmm(head_probs.transpose(1, 2), grad))
                # Softmax backward in place, p * dp - p * sum_j(p_j dp_j); then the scale of q k^T.
                grad_scores = torch.bmm(grad, v.transpose(1, 2)).mul_(head_probs)  # [B, N, N]
                grad_scores.addcmul_(head_probs, grad_scores.sum(-1, keepdim=True), value=-1).mul_(scale)
                grad_q.append(torch.bmm(grad_scores, k))
                grad_k.append(torch.bmm(grad_scores.transpose(1, 2), q))
        grad_qkv = torch.stack(grad_q + grad_k + grad_v, dim=2)  # [B, N, 3 * heads, head_dim]
        return grad_qkv.view(qkv.shape).to(qkv.dtype), None


def _heads(qkv: torch.Tensor):
    """Per head, its q, k, v `[B, N, head_dim]`: strided views of packed `[B, N, 3, heads, head_dim]`."""
    for h in range(qkv.shape[3]):
        yield qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]


def widened_flash_attention(qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = split_heads(qkv)  # 3 x [B, heads, N, head_dim]
    return WidenedFlashAttention.apply(q, k, v).transpose(1, 2)


class WidenedFlashAttention(torch.autograd.Function):
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


def _widened(x: torch.Tensor) -> torch.Tensor:
    """A bf16/fp16 tensor as fp32 (exact); any other tensor as it is."""
    return x.float() if x.dtype in LOW_PRECISIONS else x
