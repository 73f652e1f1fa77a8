"""The machine a benchmark ran on, and the matrix-multiply peak it reaches per dtype.

The peak is measured in the same run (same threads, same load) so that "share of peak" compares
like with like: best FLOP/s over a few large square products.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import torch

from openmae import hardware
from openmae.accel import Autotuner
from openmae.accel.gemm import Bf16Gemm
from openmae.engine.precision import Precision

_PACKAGES = ("openmae", "torch", "transformers", "timm", "torchvision", "numpy", "pillow")


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    """CPU/GPU, memory, OS, thread count and library versions, for the results header."""
    info = {
        "cpu": hardware.cpu_name(),
        "cpu_cores": hardware.usable_cores(),
        "cpu_flags": hardware.cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": hardware.cpu_has_matrix_units(torch.bfloat16),
        "memory_gb": hardware.memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {name: _version(name) for name in _PACKAGES},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _best_flops(
    a: torch.Tensor, b: torch.Tensor, repeats: int, device: torch.device, slow_s: float = 0.5
) -> float:
    """Best FLOP/s of the square product `a @ b`, over the three memory layouts a GEMM sees in
    training (`a @ b`, `a @ b.T`, `a.T @ b`) and `repeats` timed runs after an untimed one. A
    product slower than `slow_s` is timed once (its start-up is a small share of it): native bf16
    on a CPU without bf16 units takes seconds a product, minutes in all if repeated."""
    n = a.shape[0]
    best = float("inf")
    for x, y in ((a, b), (a, b.t()), (a.t(), b)):
        for i in range(repeats + 1):
            start = time.perf_counter()
            x @ y
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            if i or seconds > slow_s:
                best = min(best, seconds)
            if seconds > slow_s:
                break
    return 2 * n**3 / best


def matmul_peak(device: torch.device, precision: Precision, size: int = 2048, repeats: int = 3) -> dict:
    """Measured matrix-multiply FLOP/s for a precision: `{"peak": best, <way>: FLOP/s, ...}`.

    fp32: square fp32 products. bf16: bf16 products by the kernel torch picks ("native") and, on the
    CPU, also as fp32 GEMMs on bf16 values ("via_fp32", openmae's `accel.gemm=fp32`); the peak is
    the faster way.
    """
    generator = torch.Generator().manual_seed(0)

    def square(n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(n, n, generator=generator).to(device, dtype)

    if precision == "fp32":
        a, b = square(size, torch.float32), square(size, torch.float32)
        flops = _best_flops(a, b, repeats, device)
        return {"peak": flops, "fp32": flops}
    a, b = square(size, torch.bfloat16), square(size, torch.bfloat16)
    found = {"native": _best_flops(a, b, repeats, device)}
    if device.type == "cpu":
        with Bf16Gemm(Autotuner(), path="fp32"):
            found["via_fp32"] = _best_flops(a, b, repeats, device)
    return {"peak": max(found.values()), **found}
