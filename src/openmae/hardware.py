"""What this machine offers that changes how openmae runs: matrix units for bf16/fp16 on the CPU,
the CPU's name and flags, the cores this process may use, and CUDA.

Every hardware-dependent choice reads it through this module (`hardware.cpu_has_matrix_units(...)`,
not a copied name), so that a test can force either answer on any machine with
`monkeypatch.setattr(hardware, "cpu_has_matrix_units", ...)` and exercise both branches.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Callable
from functools import cache

import torch

# The flags that decide how fast a CPU runs fp32 and bf16 matrix products.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


@cache
def _onednn_has_native(dtype: torch.dtype) -> bool:
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_has_matrix_units(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native `dtype` kernels on this CPU (bf16: AVX512-BF16 or AMX; fp16:
    AVX512-FP16 or AMX-FP16). Without them, PyTorch's CPU bf16 GEMM runs ~8x below its fp32 one."""
    return _onednn_has_native(dtype)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def usable_cores() -> int:
    """The CPU cores this process may run on (containers and `taskset` limit them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of `SPEED_FLAGS` this CPU has (from /proc/cpuinfo; empty where there is none)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            found = set(line.split(":", 1)[1].split())
            return [flag for flag in SPEED_FLAGS if flag in found]
    return []


def memory_gb() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def describe_cpu() -> str:
    """One line for results files: name, speed flags, and whether bf16 has matrix units."""
    units = "bf16 matrix units" if cpu_has_matrix_units(torch.bfloat16) else "no bf16 matrix units"
    return f"{cpu_name()} ({', '.join(cpu_flags()) or 'no AVX2'}; {units})"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def synchronize() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so a timer reads the work's real end."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@cache
def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt` (Linux with glibc: the C allocator CPU tensors come from), or None
    (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
