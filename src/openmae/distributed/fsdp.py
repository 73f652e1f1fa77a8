"""FSDP2: parameters, gradients and optimizer state sharded over the ranks."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP gathers one at a time: every module held in an `nn.ModuleList` of `model`.

    A model keeps its repeated layers in ModuleLists (openmae's encoder and decoder blocks); they
    run one after another, so gathering one at a time bounds the full weights on a device to one
    layer's. Any model that does the same shards the same way, without this module knowing it.
    In module order, children before their parents: the order `fully_shard` must be applied in.
    """
    units = []
    for child in model.children():
        units += shard_units(child)
        if isinstance(model, nn.ModuleList):
            units.append(child)
    return units


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> nn.Module:
    """Shard `model` in place with FSDP2 (`fully_shard`): each of its `shard_units`, then the rest.

    Between its forward and backward only one unit's full weights exist on a device at a time;
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
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, tokens, norms, heads
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model whose parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
