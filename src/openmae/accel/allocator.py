"""Keep the memory a training step frees for the next step, instead of handing it back to the OS.

A CPU tensor's storage comes from the C allocator (glibc's malloc on Linux). glibc serves a large
request with a fresh `mmap` and unmaps it when freed, and returns the free top of its heap to the
OS past a threshold; where that line falls moves with what the process allocated before
("dynamic mmap threshold"). A training step allocates and frees the same activations every step,
so each step can fault in, and the kernel zero, hundreds of MB anew: on ViT-Tiny at batch 128,
~75k page faults and ~7% of the CPU time a step (measured, AMD EPYC, 2 threads), and more or less
of it from one process to the next depending on its history. With mmap off for allocations and
trimming off, freed blocks stay in the heap and the next step reuses them: no faults, the same
speed in every process. The cost: the process keeps its peak heap until it exits (as PyTorch's
CUDA caching allocator does on a GPU).

It is a setting of the whole process, set once and never undone. The loop applies it where it
helps, and a config switch turns it off: `accel.allocator` = `auto` (on for training on a CPU where
glibc is the allocator) | `retain` (required: an error where it is not available) | `system` (leave
the C allocator as it is; the benchmark's stock HF peers run so, as an HF user's loop would).
"""

from __future__ import annotations

from openmae import hardware

ALLOCATOR_CHOICES = ("auto", "retain", "system")
# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_retained = False  # set once per process: mallopt cannot be undone


def retaining() -> bool:
    """Whether this process's C allocator keeps freed memory (set by a run before)."""
    return _retained


def retain_freed_memory(choice: str, device_type: str) -> str | None:
    """Apply `choice` for a run on `device_type`; returns a line to log the first time it acts."""
    global _retained
    if choice == "system" or (choice == "auto" and device_type != "cpu"):
        return None
    mallopt = hardware.glibc_mallopt()
    if mallopt is None:
        if choice == "retain":
            raise ValueError("accel.allocator=retain needs glibc's malloc (Linux); use auto or system")
        return None
    if _retained:
        return None
    # Trim threshold -1 turns trimming off (mallopt(3)); at most 0 mmaps: every block comes from the
    # heap and goes back to it when freed.
    if not (mallopt(M_TRIM_THRESHOLD, -1) and mallopt(M_MMAP_MAX, 0)):
        raise RuntimeError("glibc's mallopt refused the allocator settings")
    _retained = True
    return "accel: CPU allocator keeps freed memory for reuse (glibc: no mmap, no trimming)"
