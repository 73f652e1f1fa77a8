"""Evaluation over all ranks: every validation sample is seen by exactly one rank, once."""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Sampler


class ShardedEvalSampler(Sampler[int]):
    """Indices `rank, rank + W, rank + 2W, ...` of a dataset: disjoint shards that cover it exactly.

    Unlike `DistributedSampler` nothing is padded or dropped, so sums over ranks count every
    sample once; shard lengths differ by at most one (`all_reduce_sum` and `all_gather_cat` do not
    mind). Rank and world size default to this process's.

    With `contiguous`, rank r takes one block of consecutive indices instead (the longer blocks
    first), so `all_gather_cat` of per-sample results comes back in dataset order: the linear
    probe's cached training features and the k-NN bank are then those of a single process.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int | None = None,
        world_size: int | None = None,
        contiguous: bool = False,
    ) -> None:
        joined = dist.is_available() and dist.is_initialized()
        self.num_samples = num_samples
        self.rank = rank if rank is not None else (dist.get_rank() if joined else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if joined else 1)
        self.contiguous = contiguous
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    def _indices(self) -> range:
        if not self.contiguous:
            return range(self.rank, self.num_samples, self.world_size)
        size, longer = divmod(self.num_samples, self.world_size)  # the first `longer` ranks take one more
        start = self.rank * size + min(self.rank, longer)
        return range(start, start + size + (self.rank < longer))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
