"""Run checkpoints: weights as safetensors plus the training state, both written atomically.

A checkpoint `checkpoint-<step>` is two files in the run's folder:
- `checkpoint-<step>.safetensors`: the model (decoder included), with config and extras in the
  metadata — loadable on its own by `openmae.load_checkpoint`;
- `checkpoint-<step>.state.pt`: optimizer, grad scaler, progress and RNG states, plain tensors and
  numbers only, read back with `torch.load(weights_only=True)`.

Both hold whole tensors under parameter names, whatever wrote them: one process, DDP, or FSDP (whose
shards are gathered to rank 0 first). So a checkpoint resumes under any world size, with or without
FSDP, and loads into a single-process model. The optimizer state is keyed by parameter name rather
than by position (torch.distributed.checkpoint's "full state dict") for the same reason.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from openmae.checkpoint.format import (
    is_openmae_file,
    read_metadata,
    read_weights,
    save_checkpoint,
    unwrap_model,
)
from openmae.distributed import is_sharded

_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")


def checkpoint_paths(out_dir: str | Path, step: int) -> tuple[Path, Path]:
    stem = Path(out_dir) / f"checkpoint-{step:08d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".state.pt")


def state_path_for(weights: str | Path) -> Path:
    return Path(str(weights).removesuffix(".safetensors") + ".state.pt")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (weights and state both present), oldest first."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if state_path_for(p).exists()]


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`None` -> no resume; `auto` -> the newest checkpoint in `out_dir` (or none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint to resume from in {path}")
        return found[-1]
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {path}")
    return path


def check_run_checkpoint(weights: str | Path) -> None:
    """ValueError unless `weights` and its `.state.pt` look like a complete run checkpoint: an openmae
    weights file (header read, not the tensors) and a state file torch.save wrote (a whole zip).

    A cheap check made before a resumed run writes anything; `load_run_checkpoint` reads them later.
    """
    weights = Path(weights)
    if not is_openmae_file(read_metadata(weights)):
        raise ValueError(f"cannot resume from {weights}: not a checkpoint openmae wrote (no format=openmae)")
    state = state_path_for(weights)
    if not state.is_file():
        raise ValueError(f"cannot resume from {weights}: its training state {state.name} is missing")
    if not zipfile.is_zipfile(state):
        raise ValueError(
            f"cannot resume from {weights}: its training state {state.name} is empty or truncated"
        )


def rng_state() -> dict:
    """Torch, CUDA, NumPy and Python RNG states as tensors and numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    training_state: dict,
    metadata: dict[str, str],
    keep_last: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights and training state for `step`; then drop all but the newest `keep_last`.

    `model_state` replaces `model.state_dict()` (see `full_model_state` for a sharded model).
    """
    weights, state = checkpoint_paths(out_dir, step)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, weights, metadata={**metadata, "step": str(step)}, state_dict=model_state)
    tmp = state.with_name(state.name + ".tmp")
    torch.save({**training_state, "rng": rng_state()}, tmp)
    os.replace(tmp, state)
    if keep_last:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
            state_path_for(old).unlink(missing_ok=True)
    return weights


def load_run_checkpoint(weights: str | Path, model: nn.Module) -> dict:
    """Load weights into `model` and return the training state (RNG states already restored).

    A sharded model takes its shard of the whole weights (every rank calls; each reads the file).
    """
    weights = Path(weights)
    try:
        saved = read_weights(weights).state
        state = torch.load(state_path_for(weights), map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:  # empty, truncated, not ours
        raise ValueError(f"cannot resume from {weights}: {type(error).__name__}: {error}") from error
    if is_sharded(model):
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True))
    else:
        expected = unwrap_model(model).state_dict()
        if set(saved) != set(expected) or any(saved[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(f"cannot resume from {weights}: it holds the weights of another model")
        unwrap_model(model).load_state_dict(saved)
    set_rng_state(state.pop("rng"))
    return state


# ------------------------------------------------------------------------------------------------
# Whole states of sharded models; collectives under FSDP, so every rank calls them.

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole weights of an FSDP-sharded `model` on rank 0 (`{}` elsewhere); None when not sharded."""
    return get_model_state_dict(model, options=_GATHER) if is_sharded(model) else None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer state keyed by parameter name, whole, on rank 0 (`{}` elsewhere).

    None before the first step: asking torch for it then would take a zero step to create it.
    """
    if not optimizer.state:
        return None
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None) -> None:
    """Load what `full_optimizer_state` gave into an optimizer over `model` (sharded or not)."""
    if state is None:
        return
    if any(isinstance(key, int) for key in state["state"]):  # keyed by position: written before names
        if is_sharded(model):
            raise ValueError("this checkpoint's optimizer state is keyed by position; resume it without FSDP")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
