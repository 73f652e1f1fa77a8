"""Joining and leaving the process group, who this process is, and what a dead peer looks like."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from openmae import hardware


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; `cuda` without a GPU is a clear error."""
    if name == "auto":
        if hardware.cuda_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not hardware.cuda_available():
            raise ValueError("device 'cuda' was asked for but there is no CUDA GPU; use device=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_name: str = "auto", timeout: timedelta | None = None) -> DistInfo:
    """Join the process group if launched by torchrun; return this process's rank and device.

    Args:
        device_name: `auto | cpu | cuda | cuda:N | mps`; under torchrun `cuda` means `cuda:LOCAL_RANK`.
        timeout: how long a collective waits for a silent peer before failing (torch's default,
            10 min for nccl and 30 min for gloo, when None). torchrun already stops the job as soon
            as a process dies; this bounds the wait when a peer hangs without dying.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "mps":
            raise RuntimeError("multi-process training runs on CUDA GPUs or the CPU; use device=cpu on a Mac")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a process outside any group: the one that prints and writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# A peer that died: say so, instead of a backend's socket error.


class PeerFailureError(RuntimeError):
    """A collective failed on this rank because another rank of the job died or hung."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` came out of a collective (gloo's are plain RuntimeErrors naming gloo)."""
    return isinstance(error, dist.DistError) or "gloo" in str(error).lower()


def peer_failure(rank: int, error: BaseException) -> PeerFailureError:
    """The error to raise instead of a collective's: what happened and where to look."""
    first_line = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return PeerFailureError(
        f"rank {rank}: lost contact with the other processes of the job ({first_line}). "
        "Another rank most likely died or hung: its own error, and the 'Root Cause' in torchrun's "
        "summary, say why. This rank stops too; resume from the last checkpoint with resume=auto."
    )
