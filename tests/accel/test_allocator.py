"""The C allocator setting: it stops a CPU step's freed memory from being faulted in anew, it is
applied where the run asks for it (and only there), and it fails clearly where it cannot be."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openmae import hardware
from openmae.accel import AccelConfig, Acceleration, allocator

# Allocate, touch and free 64 MB eleven times (above glibc's largest dynamic mmap threshold, so the
# stock allocator maps it afresh each time); print the page faults of the last eight rounds.
FAULTS_SCRIPT = """
import resource, sys, torch
from openmae.accel import allocator
allocator.retain_freed_memory(sys.argv[1], "cpu")
def round_trip():
    x = torch.empty(16 * 2**20).fill_(1.0)
    del x
for _ in range(3):  # the heap grows to hold the block, an aligned request may grow it again
    round_trip()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def page_faults(choice: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, choice], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(hardware.glibc_mallopt() is None, reason="needs glibc's malloc")
def test_retained_memory_is_reused_without_page_faults():
    stock, retained = page_faults("system"), page_faults("retain")
    assert stock > 8 * 16_000 / 2  # 16k 4-KiB pages a round: the stock allocator maps each anew
    assert retained < stock / 4  # reused (at most one more growth of the heap)


class FakeMallopt:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def fake_mallopt(monkeypatch):
    fake = FakeMallopt()
    monkeypatch.setattr(hardware, "glibc_mallopt", lambda: fake)
    monkeypatch.setattr(allocator, "_retained", False)
    return fake


def test_auto_retains_on_a_cpu_once_and_says_so(fake_mallopt):
    accel = Acceleration(AccelConfig(cache=False), torch.device("cpu"), "fp32")
    assert fake_mallopt.calls == [(allocator.M_TRIM_THRESHOLD, -1), (allocator.M_MMAP_MAX, 0)]
    assert any("allocator keeps freed memory" in line for line in accel.report())
    Acceleration(AccelConfig(cache=False), torch.device("cpu"), "fp32")  # a second run: set already
    assert len(fake_mallopt.calls) == 2 and allocator.retaining()


@pytest.mark.parametrize(("choice", "device"), [("system", "cpu"), ("auto", "cuda")])
def test_the_allocator_is_left_alone_when_not_asked_for(fake_mallopt, choice, device):
    assert allocator.retain_freed_memory(choice, device) is None
    assert fake_mallopt.calls == [] and not allocator.retaining()


def test_without_glibc_auto_does_nothing_and_retain_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hardware, "glibc_mallopt", lambda: None)
    monkeypatch.setattr(allocator, "_retained", False)
    assert allocator.retain_freed_memory("auto", "cpu") is None
    with pytest.raises(ValueError, match="accel.allocator=retain needs glibc"):
        allocator.retain_freed_memory("retain", "cpu")


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="accel.allocator must be one of auto, retain, system"):
        AccelConfig(allocator="keep")
