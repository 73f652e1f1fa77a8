"""What every training recipe does around the loop, in one place.

A recipe checks all of its input first (`checked`: any error becomes a one-line `UsageError`
before anything is written), then opens the run (`open_run`: the output folder, the resolved config,
the lr line, the logger) and hands the rest to `engine.loop.Trainer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from openmae.checkpoint import check_run_checkpoint, list_checkpoints, resolve_resume
from openmae.config import config_to_dict, save_config
from openmae.distributed import DistInfo, all_reduce_sum, init_distributed
from openmae.engine.loop import Hook, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig
from openmae.engine.precision import check_precision
from openmae.errors import DivergedError, UsageError
from openmae.logging import RunLogger
from openmae.plots import CURVES_FILE, plot_runs

# What a run leaves in its folder (a rerun without resume must not mix with them).
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "model.safetensors",
    "best.safetensors",
    "ema.safetensors",
    "results.json",
    CURVES_FILE,
)
RUN_FOLDERS = ("tensorboard",)


@contextlib.contextmanager
def checked() -> Iterator[None]:
    """Turn the input errors raised inside into a `UsageError` (the CLI's one line and exit code 2)."""
    try:
        yield
    except (UsageError, DivergedError):
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise UsageError(" ".join(str(error).split())) from error


def join_run(cfg) -> DistInfo:
    """The process group (under torchrun) and this rank's device (`cfg.device`; any command's config);
    a bad `device`, or a `precision` the device cannot train in (fp16 off a GPU), is a UsageError."""
    with checked():
        dist = init_distributed(cfg.device)
        if hasattr(cfg, "precision"):
            check_precision(cfg.precision, dist.device)
        return dist


# A dataset smaller than one batch trains on a batch that gives at least this many steps an epoch.
FALLBACK_STEPS_PER_EPOCH = 8


def fitted_batch(
    cfg: TrainConfig, images: int, dist: DistInfo, kind: str, minimum: int = 1, multiple: int = 1
) -> TrainConfig:
    """`cfg`, or a copy with a smaller `batch_size` when `images` do not fill one global batch.

    An epoch is cut to whole global batches (batch_size x accum_iter x world size), so a dataset
    smaller than one would train on nothing. Speed no longer depends on the batch then (an epoch is
    less than one batch), so the batch falls back to one that gives 8 steps an epoch (as many as
    fit, for fewer than 8 batches' worth of images), rather than one step an epoch that learns
    little: said in one line, and the lr, computed from the config later, follows it. The method may
    need a `minimum` (2 for a BatchNorm head) or a `multiple` (2 for mixup, which pairs a batch with
    its reverse); when no such batch fits, ValueError says what to change.
    """
    per_unit = cfg.accum_iter * dist.world_size  # images a step takes per unit of batch_size
    if cfg.batch_size * per_unit <= images:
        return cfg
    smallest = max(minimum, multiple)
    batch = max(images // (per_unit * FALLBACK_STEPS_PER_EPOCH), smallest) // multiple * multiple
    if batch * per_unit > images:
        raise ValueError(
            f"the {images} training images are fewer than one global batch even at batch_size {smallest} "
            f"({smallest} x accum_iter {cfg.accum_iter} x {dist.world_size} processes): add images, or lower "
            "accum_iter or the process count"
        )
    if dist.is_main:
        steps = images // (batch * per_unit)
        print(
            f"{kind}: batch_size {cfg.batch_size} x accum_iter {cfg.accum_iter} x {dist.world_size} "
            f"processes is more than the {images} training images: using batch_size {batch} "
            f"({steps} steps an epoch)",
            flush=True,
        )
    return dataclasses.replace(cfg, batch_size=batch)


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, after checking the output folder holds no other run.

    Without `resume`, a folder that holds a run is refused (its metrics and checkpoints would mix
    with the new run's), unless `overwrite=true`, which removes that run's files (in `open_run`).
    """
    with checked():
        found = resolve_resume(cfg.resume, cfg.output_dir)
        if found is not None:
            check_run_checkpoint(found)
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


def stop_signal(trainer: Trainer) -> str | None:
    """The name of the signal that stopped the run early ("SIGINT", "SIGTERM"), None otherwise."""
    if not trainer.stopped_by_signal:
        return None
    return trainer.stop.received.name if trainer.stop.received else "a signal to another rank"


class LossCurve(Hook):
    """At the end of a run (finished or stopped), its curves as `curves.png` in its folder (rank 0)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def after_fit(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            plot_runs([self.out_dir], self.out_dir / CURVES_FILE)
        except Exception as error:  # a picture that fails must not cost the run its weights, saved next
            warnings.warn(f"could not draw {CURVES_FILE}: {type(error).__name__}: {error}", stacklevel=2)
