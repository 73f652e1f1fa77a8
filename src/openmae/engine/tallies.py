"""What the training loop counts over a span of steps, and the checks it makes of the counts."""

from __future__ import annotations

import time

import torch

from openmae.distributed import all_reduce_sum
from openmae.errors import UsageError


class UnreadableDataError(UsageError):
    """An epoch in which no image, or most images, could be read."""


def format_duration(seconds: float) -> str:
    """`3725` -> `1:02:05`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class EpochTotals:
    """Sums over a span of steps, kept on the device until read: this rank's loss over the finite
    steps, the finite steps, the unreadable images it skipped; and the global images attempted."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.sums = torch.zeros(2, device=device)  # loss over finite steps, finite steps
        self.skipped = 0
        self.images = 0
        self.world_size = world_size
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, finite: torch.Tensor, skipped: int, images: int) -> None:
        self.sums += torch.stack([loss, finite.float()])
        self.skipped += skipped
        self.images += images

    def reduced(self) -> tuple[float, int, int]:
        """(loss summed over the steps, of the global batch; finite steps; skipped images of all
        ranks): one all-reduce and one read of the device."""
        totals = all_reduce_sum(torch.cat([self.sums, self.sums.new_tensor([float(self.skipped)])]))
        loss, finite_steps, skipped = totals.tolist()
        return loss / self.world_size, round(finite_steps / self.world_size), int(skipped)


def check_readable(skipped: int, attempted: int, epoch: int) -> None:
    """An epoch that read nothing, or skipped most of its images, is an error, not a result."""
    if attempted and skipped >= attempted:
        raise UnreadableDataError(
            f"no image of epoch {epoch} could be read ({skipped} skipped): check the data path and files"
        )
    if attempted and skipped > attempted / 2:
        raise UnreadableDataError(
            f"{skipped / attempted:.0%} of the images of epoch {epoch} could not be read ({skipped} of "
            f"{attempted}); the warnings above name them"
        )
