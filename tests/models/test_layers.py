"""Attention paths: short CPU sequences as plain products, long low-precision CPU sequences through
the fp32 flash kernels, SDPA elsewhere; every path gives SDPA's result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openmae.models import layers

SHORT, LONG = 17, layers.SHORT_SEQUENCE + 1


def packed_qkv(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """`[B, N, 3, heads, head_dim]` as the qkv projection lays it out."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, 3, 16, generator=generator).to(dtype)


def sdpa(qkv: torch.Tensor) -> torch.Tensor:
    """The reference: SDPA on the split heads, `[B, N, heads, head_dim]`."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def output_and_grad(fn, qkv: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    out.backward(grad_out)
    return out.detach(), qkv.grad


def slow_low_precision(monkeypatch, slow: bool) -> None:
    monkeypatch.setattr(layers, "_slow_low_precision_cpu", lambda x: slow and x.dtype == torch.bfloat16)


def test_attention_path_by_device_dtype_and_length(monkeypatch):
    slow_low_precision(monkeypatch, True)
    assert layers.attention_path(packed_qkv(SHORT)) == "short"
    assert layers.attention_path(packed_qkv(LONG)) == "sdpa"
    assert layers.attention_path(packed_qkv(SHORT, torch.bfloat16)) == "short"
    assert layers.attention_path(packed_qkv(LONG, torch.bfloat16)) == "widened"
    assert layers.attention_path(packed_qkv(SHORT).to("meta")) == "sdpa"  # not a CPU tensor
    slow_low_precision(monkeypatch, False)  # a CPU with bf16 matrix units
    assert layers.attention_path(packed_qkv(SHORT, torch.bfloat16)) == "sdpa"


@pytest.mark.parametrize("n", [1, SHORT, layers.SHORT_SEQUENCE])
def test_short_attention_matches_sdpa_in_fp32(n):
    qkv = packed_qkv(n)
    grad_out = torch.randn(2, n, 3, 16)
    out, grad = output_and_grad(layers.ShortCpuAttention.apply, qkv, grad_out)
    ref_out, ref_grad = output_and_grad(sdpa, qkv, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_short_attention_backward_is_the_exact_derivative():
    qkv = packed_qkv(5, torch.float64)[:, :, :, :2].clone().requires_grad_()  # [2, 5, 3, 2, 16]
    assert torch.autograd.gradcheck(layers.ShortCpuAttention.apply, (qkv,))


def test_attention_in_fp32_is_sdpa_for_long_sequences():
    qkv = packed_qkv(LONG)
    assert torch.equal(layers.attention(qkv), sdpa(qkv))


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_cpu_bf16_attention_is_computed_in_fp32_and_rounded_once(n, monkeypatch):
    slow_low_precision(monkeypatch, True)
    qkv = packed_qkv(n, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers.attention(qkv)
    exact = sdpa(qkv.float())
    assert out.dtype == torch.bfloat16
    # Within one bf16 rounding (2^-8 relative) of the fp32 result on the same inputs.
    torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_cpu_bf16_attention_gradients_match_fp32_and_keep_bf16_for_backward(n, monkeypatch):
    slow_low_precision(monkeypatch, True)
    qkv32 = packed_qkv(n)
    qkv = qkv32.to(torch.bfloat16).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layers.attention(qkv)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, exact_grad = output_and_grad(sdpa, qkv.detach().float(), grad_out.float())
    assert qkv.grad.dtype == torch.bfloat16
    error = (qkv.grad.float() - exact_grad).norm() / exact_grad.norm()
    assert error < 2e-2
    # Everything kept for backward is bf16 but the flash kernels' fp32 log-sum-exp `[B, heads, N]`.
    assert saved and all(d == torch.bfloat16 for d in saved[:4]), saved
    assert saved.count(torch.float32) == (1 if n == LONG else 0)
