"""BatchNorm over the global batch, so a multi-process run normalises as one process does."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from openmae.distributed.process import is_distributed


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
