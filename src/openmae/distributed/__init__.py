"""Process-group plumbing on PyTorch's own engine (torchrun + DDP / FSDP2); single-process when not launched.

`torchrun --nproc_per_node N -m openmae pretrain ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join
the group (nccl on GPU, gloo on CPU) and pin one device per process. Without torchrun nothing
changes: world size 1, rank 0, and every helper here is a no-op.

One module per concern, for the training loop and the recipes (all importable from here):
- `process`: joining the group (`init_distributed`) and leaving it (`cleanup`), who this process
  is, and a clear error when another rank dies (`PeerFailureError`);
- `collectives` and `sampler`: evaluation over the whole validation set, each sample counted once
  (`ShardedEvalSampler`, `all_reduce_sum`, `all_gather_cat`);
- `batchnorm`: BatchNorm with the statistics of the global batch (`GlobalBatchNorm`, for the
  linear probe's head), so a run trains as one process does with the same global batch;
- `fsdp`: sharding a model with FSDP2 (`shard_model`), for models whose weights, gradients and
  optimizer state do not fit on one device when replicated;
- `signals`: a clean stop on SIGTERM, which schedulers send before pre-emption, and on Ctrl-C
  (`GracefulStop`). See docs/distributed.md.

Nothing here knows the models: FSDP finds its units by the model's structure (`shard_units`).
"""

from openmae.distributed.batchnorm import GlobalBatchNorm, use_global_batch_norm
from openmae.distributed.collectives import all_gather_cat, all_reduce_sum
from openmae.distributed.fsdp import is_sharded, shard_model, shard_units
from openmae.distributed.process import (
    DistInfo,
    PeerFailureError,
    cleanup,
    init_distributed,
    is_distributed,
    is_main_process,
    is_peer_failure,
    peer_failure,
    resolve_device,
)
from openmae.distributed.sampler import ShardedEvalSampler
from openmae.distributed.signals import GracefulStop, ignore_sigterm

__all__ = [
    "DistInfo",
    "GlobalBatchNorm",
    "GracefulStop",
    "PeerFailureError",
    "ShardedEvalSampler",
    "all_gather_cat",
    "all_reduce_sum",
    "cleanup",
    "ignore_sigterm",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "is_peer_failure",
    "is_sharded",
    "peer_failure",
    "resolve_device",
    "shard_model",
    "shard_units",
    "use_global_batch_norm",
]
