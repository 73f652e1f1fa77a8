"""Sums and concatenations over the ranks, for evaluation; no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from openmae.distributed.process import is_distributed


def all_reduce_sum(tensor: torch.Tensor, via: torch.device | str | None = None) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a single process). Sums and counts, never means.

    `via`: the device the reduction runs on when `tensor` lives elsewhere (nccl reduces GPU tensors
    only, so CPU-side counters go through the GPU); the sum lands back in `tensor`.
    """
    if dist.is_available() and dist.is_initialized():
        if via is not None and torch.device(via) != tensor.device:
            tensor.copy_(all_reduce_sum(tensor.to(via)))
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor, via: torch.device | str | None = None) -> torch.Tensor:
    """Concatenate every rank's `[N_r, ...]` along dim 0, in rank order; the `N_r` may differ.

    For k-NN: gather the features and the labels of a `ShardedEvalSampler` shard with two calls,
    and row i of both still belongs to the same sample. Returns `[sum N_r, ...]` on every rank, on
    `tensor`'s device; `via` is the device the gather runs on (nccl moves GPU tensors only).
    """
    if not is_distributed():
        return tensor
    if via is not None and torch.device(via) != tensor.device:
        return all_gather_cat(tensor.to(via)).to(tensor.device)
    world_size = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    # Collectives move equal shapes: pad every piece to the longest.
    padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, lengths, strict=True)])
