"""Attention chosen by measurement: the fastest candidate per shape, a forced path, same results."""

from __future__ import annotations

import pytest
import torch

from openmae.accel import AccelConfig, Acceleration, uninstall
from openmae.accel.attention import KEEP_PROBABILITIES, KERNELS, TunedAttention, candidates_for, timing_runs
from openmae.accel.tuner import Autotuner, Scouted
from openmae.models import create_model
from openmae.models.layers import Attention, sdpa_attention


class FavourTimer:
    """A fake timer under which `fastest` wins every measurement; records the candidates it saw."""

    def __init__(self, fastest: str) -> None:
        self.fastest = fastest
        self.seen: list[list[str]] = []

    def __call__(self, candidates, keys_timed=None, handicaps=None):
        self.seen.append(sorted(candidates))
        for run in candidates.values():
            run()  # the candidates must run on the shapes they are timed for
        return {name: 1.0 if name == self.fastest else 2.0 for name in candidates}


def qkv(n=17, dtype=torch.float32):
    return torch.randn(2, n, 3, 3, 16).to(dtype).requires_grad_()


def test_candidates_by_device_and_dtype():
    assert candidates_for(torch.device("cpu"), torch.float32) == ["sdpa", "eager", "per_head"]
    assert set(candidates_for(torch.device("cpu"), torch.bfloat16)) == set(KERNELS) - {"eager_recompute"}
    lean_bf16 = candidates_for(torch.device("cpu"), torch.bfloat16, lean=True)
    assert lean_bf16 == ["sdpa", "widened_flash", "eager_recompute"]
    assert not set(lean_bf16) & set(KEEP_PROBABILITIES)
    assert candidates_for(torch.device("cuda"), torch.bfloat16) == ["sdpa"]  # SDPA picks its own kernels


@pytest.mark.parametrize("fastest", ["per_head", "eager", "sdpa"])
def test_the_fastest_candidate_runs_and_is_cached_per_shape(fastest):
    timer = FavourTimer(fastest)
    attention = TunedAttention(Autotuner(timer=timer))
    x = qkv()
    out = attention(x)
    assert attention.kernel_for(x) == fastest
    torch.testing.assert_close(out, sdpa_attention(x), rtol=1e-5, atol=1e-5)
    attention(qkv())  # same shape: no new measurement
    assert len(timer.seen) == 1
    attention(qkv(n=5))
    with torch.no_grad():  # no gradient wanted: a shape of its own (forward only)
        attention(qkv())
    assert len(timer.seen) == 3


@pytest.mark.parametrize("fastest", ["eager_lowp", "per_head_fp32", "widened_flash"])
def test_low_precision_candidates_are_chosen_only_for_low_precision(fastest):
    timer = FavourTimer(fastest)
    attention = TunedAttention(Autotuner(timer=timer))
    assert attention.kernel_for(qkv(dtype=torch.bfloat16)) == fastest
    assert attention.kernel_for(qkv()) == "sdpa"  # not offered in fp32: the plain path is the tie-break


def test_a_forced_path_is_never_measured():
    timer = FavourTimer("sdpa")
    attention = TunedAttention(Autotuner(timer=timer), path="eager")
    assert attention.kernel_for(qkv(dtype=torch.bfloat16)) == "eager" and not timer.seen
    with pytest.raises(ValueError, match="accel.attention must be one of"):
        TunedAttention(Autotuner(), path="flash3")


def test_timing_draws_nothing_from_the_run_random_stream():
    x = qkv()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    TunedAttention(Autotuner(timer=FavourTimer("eager")))(x)
    assert torch.equal(torch.rand(4), expected)


def loss_and_grads(model, precision: str):
    torch.manual_seed(0)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(imgs, noise=noise).loss
    loss.backward()
    return loss.detach().float(), torch.cat(
        [p.grad.flatten().float() for p in model.parameters() if p.requires_grad]
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", sorted(KERNELS))
def test_a_model_trains_alike_on_every_forced_path(precision, path):
    torch.manual_seed(0)
    model = create_model("mae_vit_debug").train()
    plain_loss, plain_grads = loss_and_grads(model, precision)
    accel = Acceleration(
        AccelConfig(attention=path, gemm="native", cache=False), torch.device("cpu"), precision
    )
    assert accel.install(model) == len([m for m in model.modules() if isinstance(m, Attention)]) == 3
    loss, grads = loss_and_grads(model, precision)
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert abs(float(loss - plain_loss)) <= tolerance * float(plain_loss)
    assert float((grads - plain_grads).norm() / plain_grads.norm()) < (1e-4 if precision == "fp32" else 3e-2)
    uninstall(model)
    assert all(m.kernel is sdpa_attention for m in model.modules() if isinstance(m, Attention))


def test_lean_times_only_kernels_that_keep_no_probabilities_and_caches_apart_from_auto():
    tuner = Autotuner(timer=FavourTimer("eager_recompute"))
    x = qkv(dtype=torch.bfloat16)
    assert TunedAttention(tuner, "lean").kernel_for(x) == "eager_recompute"
    assert tuner.timer.seen == [sorted(candidates_for(x.device, x.dtype, lean=True))]
    assert TunedAttention(tuner, "auto").kernel_for(x) == "sdpa"  # its own measurement (no winner there)
    assert len(tuner.timer.seen) == 2
    with torch.no_grad():  # nothing is kept without backward: the full candidates, shared with auto
        assert TunedAttention(tuner, "lean").kernel_for(x) in KERNELS


@pytest.mark.parametrize(
    ("dtype", "batch", "scale"), [(torch.bfloat16, 4, 4), (torch.bfloat16, 20, 20 / 3), (torch.float32, 4, 0)]
)
def test_kernels_with_native_low_precision_products_are_scouted_on_part_of_the_batch(dtype, batch, scale):
    names = candidates_for(torch.device("cpu"), dtype)
    runs = timing_runs(names, torch.randn(batch, 17, 3, 3, 16).to(dtype), grad=True)
    scouted = {name for name, run in runs.items() if isinstance(run, Scouted)}
    assert scouted == ({"sdpa", "per_head"} if dtype == torch.bfloat16 else set())
    for name in scouted:
        assert runs[name].scale == scale  # an eighth of the images, at least one: 1 of 4, 3 of 20
        runs[name].scout()
        runs[name].wider()  # twice the scout's images (2 of 4, 6 of 20)


class SecondsTimer:
    """A fake timer reporting the given seconds per kernel (10 s for the rest)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def __call__(self, candidates, keys_timed=None, handicaps=None):
        return {name: self.seconds.get(name, 10.0) for name in candidates}


@pytest.mark.parametrize(
    ("per_head_s", "grad", "choice"),
    [(0.9, True, "sdpa"), (0.7, True, "per_head"), (0.9, False, "per_head")],
)
def test_auto_takes_a_kernel_keeping_probabilities_only_when_a_quarter_faster(per_head_s, grad, choice):
    # per_head keeps [B, heads, N, N] probabilities for backward, SDPA's flash kernel does not; without
    # backward nothing is kept and the fastest wins.
    accel = Acceleration(
        AccelConfig(allocator="system", cache=False), torch.device("cpu"), "fp32",
        tuner=Autotuner(timer=SecondsTimer({"sdpa": 1.0, "per_head": per_head_s})),
    )  # fmt: skip
    x = qkv().requires_grad_(grad)
    assert accel.attention.kernel_for(x) == choice
    (line,) = [line for line in accel.report() if line.startswith("accel: attention")]
    assert line.startswith(
        f"accel: attention cpu float32 [2, 17, 3, 3, 16] {'fwd+bwd' if grad else 'fwd'}: {choice}"
    )
    assert ("not 25% faster" in line) == (choice == "sdpa")
