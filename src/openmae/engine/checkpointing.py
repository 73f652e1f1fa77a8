"""The training loop's checkpoints: what it saves, where, and how it reads them back.

A checkpoint holds the model (decoder included), the optimizer and grad-scaler states, the progress,
the fast paths chosen (`openmae.accel`), and the RNG states (`openmae.checkpoint.run`). Every rank
calls `save` and `save_weights` (FSDP gathers the shards); rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from openmae.checkpoint import (
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_run_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from openmae.distributed import DistInfo


class RunCheckpointer:
    """Writes `checkpoint-<step>` files into `out_dir`, keeping the newest `keep_last`.

    Args:
        out_dir: the run's folder.
        keep_last: checkpoints kept (older ones are removed).
        metadata: strings stored with every checkpoint's weights (run config, target...).
        dist: which rank writes.
    """

    def __init__(self, out_dir: str | Path, keep_last: int, metadata: dict[str, str], dist: DistInfo) -> None:
        self.out_dir = Path(out_dir)
        self.keep_last = keep_last
        self.metadata = metadata
        self.dist = dist
        self.saved_step: int | None = None
        self.saved_path: Path | None = None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        extra: dict,
    ) -> Path | None:
        """Checkpoint `step` (once: a stop right after an epoch-end checkpoint writes nothing new)."""
        if self.saved_step == step:
            return self.saved_path
        model_state = full_model_state(model)
        optimizer_state = full_optimizer_state(model, optimizer)
        path = None
        if self.dist.is_main:
            state = {"optimizer": optimizer_state, "scaler": scaler.state_dict(), **extra}
            path = save_run_checkpoint(
                self.out_dir, step, model, state, self.metadata, self.keep_last, model_state=model_state
            )
        self.saved_step, self.saved_path = step, path
        return path

    def load(
        self,
        weights: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> dict:
        """Load a checkpoint into model, optimizer and scaler; returns the rest of its state."""
        state = load_run_checkpoint(weights, model)
        load_optimizer_state(model, optimizer, state.pop("optimizer"))
        scaler.load_state_dict(state.pop("scaler"))
        return state

    def save_weights(self, path: str | Path, model: nn.Module) -> Path | None:
        """The model's weights alone (openmae safetensors with the run's metadata)."""
        model_state = full_model_state(model)
        if not self.dist.is_main:
            return None
        return save_checkpoint(model, path, metadata=self.metadata, state_dict=model_state)
