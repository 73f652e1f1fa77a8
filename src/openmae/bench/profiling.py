"""Where a training step's time goes: torch.profiler self times grouped into a few categories.

Self time (time in an op minus its children) is added per op, so nothing is counted twice; the
gap between the step's wall time and the sum of op times is Python and framework overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins, so specific names come before the generic ones.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "convolution", "aten::linear")),
    ("attention", ("scaled_dot_product", "softmax", "attention")),  # its products count as matmul
    ("optimizer", ("adam", "_foreach_", "optimizer.")),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    (
        "copies, casts, indexing",
        (
            "copy",
            "cat",
            "gather",
            "scatter",
            "index",
            "clone",
            "contiguous",
            "_to_copy",
            "fill",
            "zero",
            "empty",
        ),
    ),
    ("other elementwise", ("add", "mul", "sub", "div", "pow", "sum", "mean", "where", "sqrt", "var", "neg")),
)


def category(op_name: str) -> str:
    """The category of a profiler op name, e.g. "aten::addmm" -> "matmul"; "other ops" if none fits."""
    name = op_name.lower()
    for label, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return label
    return "other ops"


def profile_step(step: Callable[[], torch.Tensor], device: torch.device, steps: int = 1) -> dict:
    """Profile `steps` calls of `step` (already warmed up).

    Returns `{"wall_s", "categories": [(label, seconds, share)], "top_ops": [(name, seconds, share)]}`
    per step, shares of the wall time, largest first; "Python / framework" holds the untimed rest.
    """
    activities = [ProfilerActivity.CPU]
    on_gpu = device.type == "cuda"
    if on_gpu:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / steps
    per_op: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if us > 0 and not event.key.startswith(("ProfilerStep", "Optimizer.step", "Optimizer.zero_grad")):
            per_op[event.key] = per_op.get(event.key, 0.0) + us / 1e6 / steps
    per_category: dict[str, float] = {}
    for name, seconds in per_op.items():
        label = category(name)
        per_category[label] = per_category.get(label, 0.0) + seconds
    if not on_gpu:
        per_category["Python / framework"] = max(0.0, wall - sum(per_op.values()))
    ranked = sorted(per_category.items(), key=lambda kv: -kv[1])
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return {
        "wall_s": wall,
        "categories": [(label, s, s / wall) for label, s in ranked],
        "top_ops": [(name, s, s / wall) for name, s in top],
    }


def live_memory_peak(step: Callable[[], torch.Tensor]) -> dict:
    """The most one call of `step` holds above what it started with (the profiler's memory events),
    and when in the step it peaks (0 = start, 1 = end): `{"live_peak_bytes", "live_peak_at"}`."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    if not events:
        return {"live_peak_bytes": 0, "live_peak_at": 0.0}
    live = peak = 0
    peak_at = events[0][0]
    for at, nbytes in events:
        live += nbytes
        if live > peak:
            peak, peak_at = live, at
    span = max(events[-1][0] - events[0][0], 1)
    return {"live_peak_bytes": peak, "live_peak_at": (peak_at - events[0][0]) / span}
