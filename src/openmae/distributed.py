"""Process-group plumbing on PyTorch's own engine (torchrun + DDP / FSDP2); single-process when not launched.

`torchrun --nproc_per_node N -m openmae pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join
the group (nccl on GPU, gloo on CPU) and pin one device per process. Without torchrun nothing
changes: world size 1, rank 0, and every helper here is a no-op.

What lives here, for the training loop and the recipes:
- joining the group (`init_distributed`) and leaving it (`cleanup`);
- sharding a model with FSDP2 (`shard_model`), for models whose weights, gradients and optimizer
  state do not fit on one device when replicated;
- evaluation over the whole validation set, each sample counted once (`ShardedEvalSampler`,
  `all_reduce_sum`, `all_gather_cat`);
- BatchNorm with the statistics of the global batch (`GlobalBatchNorm`, for the linear probe's
  head), so a run trains as one process does with the same global batch;
- a clean stop on SIGTERM (`GracefulStop`), which schedulers send before pre-emption, and a clear
  error when another rank dies (`PeerFailureError`). See docs/distributed.md.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from openmae import hardware
from openmae.models.layers import Block


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


# ------------------------------------------------------------------------------------------------
# Evaluation over all ranks: every validation sample is seen by exactly one rank, once.


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


# ------------------------------------------------------------------------------------------------
# BatchNorm over the global batch.


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum that gradients flow through (the gradient is summed over the ranks too)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device.

    What `torch.nn.SyncBatchNorm` does, which runs on GPUs only: in training, the mean and
    variance over every rank's batch (two all-reduces of `[C]` sums), so normalisation and running
    statistics are those one process gets with the whole batch, and the running statistics are the
    same on every rank. In eval mode, or outside a process group, it is a plain BatchNorm. Input
    `[B, C, ...]`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [B, C, ...], got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # all but the channels
        shape = [1, -1] + [1] * (x.dim() - 2)  # [1, C, 1, ...]
        local_count = x.new_tensor([x.numel() // max(x.shape[1], 1)])
        # Two passes, as a single BatchNorm does: the mean, then the spread around it.
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count  # [C]
        var = _SumOverRanks.apply((x - mean.view(shape)).square().sum(dims)) / count  # [C], biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), momentum)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def use_global_batch_norm(model: nn.Module) -> int:
    """Turn every BatchNorm of `model` into a `GlobalBatchNorm`, in place; returns how many.

    The parameters and buffers stay the same objects (an optimizer built over them still holds
    them), and so do the state-dict keys.
    """
    replaced = 0
    for name, child in model.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            synced = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            for key, value in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(synced, key, value)
            synced.train(child.training)
            setattr(model, name, synced)
            replaced += 1
        else:
            replaced += use_global_batch_norm(child)
    return replaced


# ------------------------------------------------------------------------------------------------
# FSDP2: parameters, gradients and optimizer state sharded over the ranks.


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> nn.Module:
    """Shard `model` in place with FSDP2 (`fully_shard`): each transformer block, then the rest.

    Between its forward and backward only one block's full weights exist on a device at a time;
    everything else stays as a `1/W` shard, and so do the gradients and the optimizer state built
    over them. `fully_shard` replaces each parameter by a sharded one, so the parameters in
    `optimizer` (which must not have stepped yet) are swapped for their shards, by name.

    Returns the same `model` object, now sharded (its class becomes `FSDP<Class>`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if optimizer.state:
        raise RuntimeError("shard the model before the optimizer's first step (its state would be lost)")
    # FSDP warns that the root returns views (MAEOutput.pred is one); no task edits outputs in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    names = {id(p): name for name, p in model.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in model.modules():
        if isinstance(module, Block):  # encoder and decoder blocks: the units gathered one at a time
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, tokens, norms, heads
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model whose parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Stopping cleanly when the scheduler says so.


class GracefulStop:
    """While active, SIGTERM does not kill the process: it only sets `requested`.

    Schedulers send SIGTERM before pre-emption or at the time limit (SLURM follows with SIGKILL
    after `KillWait`, 30 s by default), and torchrun forwards it to every worker (then kills them
    after `--shutdown-timeout`, 30 s by default). The training loop polls `requested` once per
    step, agrees with the other ranks, writes a checkpoint and returns, so the job can be
    requeued and resumed. Outside the `with` block the previous handlers are back.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> GracefulStop:
        # Python only lets the main thread install handlers; elsewhere the defaults stay.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: loading workers ignore SIGTERM.

    A scheduler signals every process of the job; a worker killed by it would crash the training
    process mid-step instead of letting it checkpoint. The workers still end with their parent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
