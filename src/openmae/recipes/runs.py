"""What every training recipe does around the loop, in one place.

A recipe checks all of its input first (`checked`: any error becomes a one-line `UsageError`
before anything is written), then opens the run (`open_run`: the output folder, the resolved config,
the lr line, the logger) and hands the rest to `engine.loop.Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from openmae.checkpoint import list_checkpoints, resolve_resume
from openmae.config import config_to_dict, save_config
from openmae.distributed import DistInfo, all_reduce_sum, init_distributed
from openmae.engine.loop import TrainConfig
from openmae.engine.optim import OptimConfig
from openmae.errors import UsageError
from openmae.logging import RunLogger

# What a run leaves in its folder (a rerun without resume must not mix with them).
RUN_FILES = ("config.yaml", "metrics.jsonl", "model.safetensors", "best.safetensors", "results.json")
RUN_FOLDERS = ("tensorboard",)


@contextlib.contextmanager
def checked() -> Iterator[None]:
    """Turn the input errors raised inside into a `UsageError` (the CLI's one line and exit code 2)."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise UsageError(" ".join(str(error).split())) from error


def join_run(cfg: TrainConfig) -> DistInfo:
    """The process group (under torchrun) and this rank's device; a bad `device` is a UsageError."""
    with checked():
        return init_distributed(cfg.device)


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, after checking the output folder holds no other run.

    Without `resume`, a folder that holds a run is refused (its metrics and checkpoints would mix
    with the new run's), unless `overwrite=true`, which removes that run's files (in `open_run`).
    """
    with checked():
        found = resolve_resume(cfg.resume, cfg.output_dir)
    if cfg.resume is None and holds_run(cfg.output_dir) and not cfg.overwrite:
        raise UsageError(
            f"{cfg.output_dir} holds a run already: continue it with resume=auto, replace it with "
            "overwrite=true, or choose another output_dir"
        )
    return found


def holds_run(out_dir: str | Path) -> bool:
    folder = Path(out_dir)
    return folder.is_dir() and (
        any((folder / name).exists() for name in (*RUN_FILES, *RUN_FOLDERS)) or bool(list_checkpoints(folder))
    )


@dataclass
class OpenRun:
    out_dir: Path
    logger: RunLogger
    peak_lr: float
    metadata: dict[str, str]


def open_run(cfg: TrainConfig, optim: OptimConfig, dist: DistInfo, kind: str, **metadata: str) -> OpenRun:
    """Create the output folder (emptied of an old run with `overwrite`), save the resolved config,
    say the lr and where it came from, and start the logger. Call once every input is checked."""
    out_dir = Path(cfg.output_dir)
    # Every rank has checked the folder (`resume_point`) before rank 0 writes into it.
    all_reduce_sum(torch.zeros(1, device=dist.device))
    effective_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    peak_lr, lr_source = optim.peak_lr(effective_batch)
    if dist.is_main:
        if cfg.overwrite and cfg.resume is None:
            remove_run(out_dir)
        save_config(cfg, out_dir / "config.yaml")
        print(f"{kind}: {lr_source}", flush=True)
    logger = RunLogger(out_dir, enabled=dist.is_main)
    run_metadata = {"run_config": json.dumps(config_to_dict(cfg)), "task": kind, **metadata}
    return OpenRun(out_dir, logger, peak_lr, run_metadata)


def remove_run(out_dir: Path) -> None:
    """Delete what a run wrote into `out_dir` (nothing else in the folder)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for weights in list_checkpoints(out_dir):
        weights.unlink(missing_ok=True)
        weights.with_name(weights.name.replace(".safetensors", ".state.pt")).unlink(missing_ok=True)
    for picture in out_dir.glob("reconstructions-epoch*.png"):
        picture.unlink()
