"""Every attention kernel gives the plain path's result (SDPA), forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openmae.accel import kernels
from openmae.accel.attention import KERNELS
from openmae.models.layers import sdpa_attention


def packed_qkv(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """`[B, N, 3, heads, head_dim]` as the qkv projection lays it out."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, 3, 16, generator=generator).to(dtype)


def output_and_grad(fn, qkv: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.detach().requires_grad_()
    out = fn(qkv)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), qkv.grad


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("n", [1, 17, 129])
def test_every_kernel_matches_sdpa_in_fp32(name, n):
    qkv, grad_out = packed_qkv(n), torch.randn(2, n, 3, 16)
    out, grad = output_and_grad(KERNELS[name], qkv, grad_out)
    ref_out, ref_grad = output_and_grad(sdpa_attention, qkv, grad_out)
    assert out.shape == (2, n, 3, 16)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("n", [17, 129])
def test_every_kernel_in_bf16_is_within_bf16_rounding_of_the_fp32_result(name, n):
    qkv32, grad_out = packed_qkv(n), torch.randn(2, n, 3, 16)
    out, grad = output_and_grad(KERNELS[name], qkv32.to(torch.bfloat16), grad_out)
    exact_out, exact_grad = output_and_grad(sdpa_attention, qkv32.to(torch.bfloat16).float(), grad_out)
    assert out.dtype == grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact_out, rtol=2e-2, atol=2e-2)
    assert (grad.float() - exact_grad).norm() / exact_grad.norm() < 3e-2


class ScoreMatrixDtypes(TorchDispatchMode):
    """Records the dtype of every op output shaped like a score matrix `[..., N, N]`."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.dtypes = n, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[-2:] == (self.n, self.n):
            self.dtypes.add(out.dtype)
        return out


@pytest.mark.parametrize(("name", "fp32_scores"), [("eager", True), ("eager_lowp", False)])
def test_eager_lowp_never_widens_the_score_matrix(name, fp32_scores):
    n = 9
    qkv, grad_out = packed_qkv(n, torch.bfloat16), torch.randn(2, n, 3, 16)
    with ScoreMatrixDtypes(n) as seen:
        output_and_grad(KERNELS[name], qkv, grad_out)
    assert torch.bfloat16 in seen.dtypes
    assert (torch.float32 in seen.dtypes) == fp32_scores


def test_widened_products_round_once():
    qkv = packed_qkv(17, torch.bfloat16)
    out = kernels.per_head_fp32_attention(qkv)
    exact = sdpa_attention(qkv.float())
    torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-5)  # one bf16 rounding


def test_per_head_backward_is_the_exact_derivative():
    qkv = packed_qkv(5, torch.float64)[:, :, :, :2].clone().requires_grad_()  # [2, 5, 3, 2, 16]
    assert torch.autograd.gradcheck(kernels.per_head_attention, (qkv,))


def test_widened_flash_keeps_bf16_tensors_for_backward():
    qkv = packed_qkv(129, torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        kernels.widened_flash_attention(qkv)
    # q, k, v and the output in bf16; the flash kernels' fp32 log-sum-exp `[B, heads, N]`.
    assert saved[:4] == [torch.bfloat16] * 4 and saved.count(torch.float32) == 1


@pytest.mark.parametrize(("name", "keeps_scores"), [("eager_lowp", True), ("eager_recompute", False)])
def test_eager_recompute_keeps_no_score_matrix_for_backward(name, keeps_scores):
    n = 9
    qkv = packed_qkv(n, torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        KERNELS[name](qkv)
    assert any(shape[-2:] == (n, n) for shape in saved) == keeps_scores


def test_eager_recompute_gives_eager_lowp_results():
    qkv, grad_out = packed_qkv(33, torch.bfloat16), torch.randn(2, 33, 3, 16)
    out, grad = output_and_grad(kernels.eager_recompute_attention, qkv, grad_out)
    ref_out, ref_grad = output_and_grad(kernels.eager_lowp_attention, qkv, grad_out)
    assert torch.equal(out, ref_out)  # the same products and softmax
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2)  # grads summed in another order


def test_eager_recompute_backward_is_the_exact_derivative():
    qkv = packed_qkv(5, torch.float64)[:, :, :, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(kernels.eager_recompute_attention, (qkv,))
