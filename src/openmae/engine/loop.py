"""The one training loop: pretraining, linear probing and fine-tuning all run through `Trainer`.

What differs between them is the `task` (a callable that turns a batch into a loss), the model, the
optimizer and the hooks; the loop owns everything else: resumable data order, gradient
accumulation, mixed precision, clipping, non-finite guards, the lr schedule, logging, checkpoints,
and scale-out: DDP (`no_sync` on non-final micro-steps) or FSDP2 (`fsdp=true`) under torchrun, and a
clean stop with a checkpoint on SIGTERM. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from openmae.distributed import (
    DistInfo,
    GracefulStop,
    all_reduce_sum,
    ignore_sigterm,
    is_peer_failure,
    peer_failure,
    shard_model,
    use_global_batch_norm,
)
from openmae.engine.checkpoint import (
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_run_checkpoint,
    save_run_checkpoint,
)
from openmae.engine.optim import set_lr
from openmae.engine.precision import Precision, autocast, check_precision, gemm_context
from openmae.engine.sampler import SeededDataset, SeededSampler, collate_seeded
from openmae.engine.schedule import warmup_cosine_lr
from openmae.interop import save_checkpoint
from openmae.logging import RunLogger


@dataclass
class TrainConfig:
    """What the loop needs; the recipes' configs extend it, so these keys sit at the top level."""

    epochs: int = field(default=800, metadata={"help": "training epochs (the schedule spans them)"})
    batch_size: int = field(default=64, metadata={"help": "images per device per micro-step"})
    accum_iter: int = field(default=1, metadata={"help": "micro-steps accumulated per optimizer step"})
    precision: Precision = field(
        default="fp32", metadata={"help": "fp32 | bf16 (autocast) | fp16 (GPU, scaler)"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, augmentation, masking and init"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop (with a checkpoint) after this many steps"}
    )
    log_every: int = field(default=20, metadata={"help": "optimizer steps between log lines"})
    save_every: int = field(default=1, metadata={"help": "epochs between checkpoints"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept in the output folder"})
    max_nonfinite: int = field(default=5, metadata={"help": "non-finite losses in a row that stop the run"})
    output_dir: str = field(default="runs/run", metadata={"help": "folder for checkpoints, logs and config"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint path, or 'auto' for the newest"})
    time_budget_min: float | None = field(
        default=None,
        metadata={"help": "fit the run into this many minutes: after a short calibration the schedule is "
                  "shortened to the images that fit (the run then depends on the machine's speed)"},
    )  # fmt: skip
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (measured, optional)"})
    fsdp: bool = field(
        default=False, metadata={"help": "under torchrun: shard weights, grads, optimizer state (FSDP2)"}
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block in the backward pass (less memory)"}
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_iter < 1:
            raise ValueError("epochs, batch_size and accum_iter must be at least 1")


class Task(Protocol):
    """Turns a batch `(images, labels, seeds)` into a scalar loss and extra metrics (tensors)."""

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> tuple[torch.Tensor, dict]: ...


@dataclass
class Progress:
    """Where the run is; counted in images so it survives a change of world or batch size."""

    epoch: int = 0
    images_in_epoch: int = 0
    step: int = 0
    images_seen: int = 0
    planned_images: int = 0  # set by a time budget; 0 = epochs x epoch length


@dataclass
class Schedule:
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    clip_grad: float | None = None


class NonFiniteLossError(RuntimeError):
    pass


def format_duration(seconds: float) -> str:
    """`3725` -> `1:02:05`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Trainer:
    """Runs `task` over `dataset` for `cfg.epochs`, stepping `optimizer` on `model`.

    Args:
        model: the single-device model, on its device (wrapped in DDP here when the run is distributed,
            or sharded in place with `cfg.fsdp`).
        task: the loss of a batch.
        dataset: items `(image, label)` or None (unreadable); wrapped for a replayable order.
        optimizer: built over `model`'s parameters, not stepped yet.
        schedule: peak/min lr, warm-up and clipping.
        cfg: the loop's part of the run config.
        dist: rank, world size and device.
        logger: metrics sink (rank 0 writes).
        num_workers: data-loading processes.
        metadata: strings stored with every checkpoint's weights (config, target...).
        on_epoch_end: called with the epoch index; returns extra metrics to log (evaluation...).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        dataset: Dataset,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        cfg: TrainConfig,
        dist: DistInfo,
        logger: RunLogger,
        num_workers: int = 0,
        metadata: dict[str, str] | None = None,
        on_epoch_end: Callable[[int], dict] | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.task = task
        self.optimizer = optimizer
        self.schedule = schedule
        self.logger = logger
        self.metadata = metadata or {}
        self.on_epoch_end = on_epoch_end
        self.model = model  # without the DDP / compile wrappers: checkpoints, evaluation
        # FSDP needs a process group; in a single process `fsdp` changes nothing.
        self.sharded = cfg.fsdp and dist.enabled
        self.train_model = self._wrap(model)
        self.global_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
        self.sampler = SeededSampler(
            len(dataset), self.global_batch, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size
        )
        if self.sampler.epoch_length == 0:
            raise ValueError(
                f"the dataset ({len(dataset)} images) is smaller than one global batch ({self.global_batch})"
            )
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_seeded,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_sigterm,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.progress = Progress()
        self.nonfinite_in_a_row = 0
        self.stop = GracefulStop()
        self.stop_agreed = False  # some rank got SIGTERM: all stop after this step
        self.saved_step: int | None = None
        self.saved_path: Path | None = None

    # ----------------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        check_precision(self.cfg.precision, self.device)
        if self.cfg.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if self.dist.enabled:
            # BatchNorm (the linear probe's head) normalises with the global batch, as in one process.
            use_global_batch_norm(model)
        if self.sharded:
            if self.cfg.precision == "fp16":
                raise ValueError("fsdp runs in fp32 or bf16 (the fp16 grad scaler does not see shards)")
            shard_model(model, self.optimizer, self.device)  # in place: self.model is sharded too
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.enabled and not self.sharded:
            device_ids = [self.device] if self.device.type == "cuda" else None
            # Gradients as views into the all-reduce buckets: one copy of them instead of two.
            model = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        return model

    @property
    def epoch_images(self) -> int:
        return self.sampler.epoch_length

    @property
    def total_images(self) -> int:
        return self.progress.planned_images or self.cfg.epochs * self.epoch_images

    def plan_time_budget(self) -> None:
        """Fit the schedule into `time_budget_min`: plan after 10 steps, then re-plan after 20, 40, 80...

        Each plan measures the rate since the run started, so a machine that slows down (or speeds
        up) part-way is followed; the plan stays inside `epochs`. Steps, not clocks, decide when to
        plan, so every rank plans at the same step. A resumed run keeps the plan it was saved with.
        """
        p, budget = self.progress, self.cfg.time_budget_min
        if self.next_plan_step is None or p.step < self.next_plan_step:
            return
        steps_run = p.step - self.first_step
        self.next_plan_step = self.first_step + 2 * steps_run
        elapsed = time.perf_counter() - self.run_started
        rate = torch.tensor(steps_run * self.global_batch / elapsed)
        rate = float(all_reduce_sum(rate)) / self.dist.world_size  # the same plan on every rank
        fit = p.images_seen + rate * max(budget * 60 - elapsed, 0)
        steps = max(int(min(fit, self.cfg.epochs * self.epoch_images)) // self.global_batch, 1)
        planned = max(steps * self.global_batch, p.images_seen)
        previous, p.planned_images = p.planned_images, planned
        if self.dist.is_main and abs(planned - previous) > 0.02 * planned:
            tqdm.write(
                f"time budget {budget:g} min at {rate:.0f} images/s: training for {planned} images "
                f"({planned / self.epoch_images:.2f} epochs)"
            )

    def lr_now(self) -> float:
        s = self.schedule
        return warmup_cosine_lr(
            self.progress.images_seen,
            self.total_images,
            s.warmup_epochs * self.epoch_images,
            s.peak_lr,
            s.min_lr,
        )

    # ----------------------------------------------------------------------------------------

    def resume(self, weights: str | Path) -> None:
        """Continue from a checkpoint written by `save` (any world size, with or without FSDP)."""
        state = load_run_checkpoint(weights, self.model)
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if self.progress.images_in_epoch % self.global_batch:
            raise ValueError(
                f"cannot resume mid-epoch at image {self.progress.images_in_epoch} with a global batch of "
                f"{self.global_batch}; resume with a batch that divides it, or from an epoch-end checkpoint"
            )

    def save(self) -> Path | None:
        """Checkpoint the current progress. Every rank calls (FSDP gathers the shards); rank 0 writes."""
        if self.saved_step == self.progress.step:  # e.g. a stop right after an epoch-end checkpoint
            return self.saved_path
        model_state = full_model_state(self.model)
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        path = None
        if self.dist.is_main:
            state = {
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict(),
                "progress": vars(self.progress).copy(),
            }
            path = save_run_checkpoint(
                self.cfg.output_dir,
                self.progress.step,
                self.model,
                state,
                self.metadata,
                self.cfg.keep_last,
                model_state=model_state,
            )
        self.saved_step, self.saved_path = self.progress.step, path
        return path

    def save_weights(self, path: str | Path) -> Path | None:
        """Write the model's weights alone (openmae safetensors, with the run's metadata).

        Every rank calls (FSDP gathers the shards); rank 0 writes and returns the path, others None.
        """
        model_state = full_model_state(self.model)
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.model, path, metadata=self.metadata, state_dict=model_state)

    def fit(self) -> Progress:
        """Train until `epochs` (or `max_steps`) is reached; checkpoint on the way and at a stop.

        SIGTERM (see `GracefulStop`) ends the run after the current step, on every rank at the same
        step, with a checkpoint to resume from.
        """
        self.run_started, self.first_step = time.perf_counter(), self.progress.step
        calibration_steps = 10
        planning = self.cfg.time_budget_min and not self.progress.planned_images
        self.next_plan_step = self.first_step + calibration_steps if planning else None
        try:
            with self.stop:
                while self.progress.epoch < self.cfg.epochs and not self.finished:
                    stopped = self.train_epoch()
                    if stopped:
                        self.save()
                        break
        except RuntimeError as error:
            if self.dist.enabled and is_peer_failure(error):
                raise peer_failure(self.dist.rank, error) from error
            raise
        finally:
            self.stop_loader_workers()
        if self.stop_agreed and not self.finished and self.dist.is_main:
            print(
                f"stopped by {self.stop.received.name if self.stop.received else 'a signal to another rank'} "
                f"at step {self.progress.step}; checkpoint: {self.saved_path}; run the same command with "
                "resume=auto to continue",
                flush=True,
            )
        return self.progress

    @property
    def finished(self) -> bool:
        """All planned images seen (epochs done, or the time budget used)."""
        return self.progress.images_seen >= self.total_images

    def stop_loader_workers(self) -> None:
        """End the data-loading workers now, on success or error.

        They ignore SIGTERM (see `ignore_sigterm`), so the terminate that Python sends its
        children at exit would not end them, and the exit would wait for them forever.
        """
        iterator = getattr(self.loader, "_iterator", None)  # where DataLoader keeps persistent workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps

    def train_epoch(self) -> bool:
        """One epoch (or its remainder after a resume). Returns True when the run must stop early."""
        p, cfg = self.progress, self.cfg
        self.sampler.set_epoch(p.epoch, start=p.images_in_epoch)
        self.train_model.train()
        images_left = min(self.epoch_images - p.images_in_epoch, self.total_images - p.images_seen)
        steps_left = images_left // self.global_batch
        bar = tqdm(
            total=steps_left,
            desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            leave=False,
        )
        loss_sum = torch.zeros((), device=self.device)
        interval_loss = torch.zeros((), device=self.device)
        skipped, steps_done, interval_steps = 0, 0, 0
        epoch_start = interval_start = time.perf_counter()
        micro_batches = iter(self.loader)
        for _ in range(steps_left):
            if p.images_seen >= self.total_images:  # a time budget shortened the run
                break
            if self.reached_max_steps() or self.stop_agreed:
                bar.close()
                return True
            loss, step_skipped = self.optimizer_step(micro_batches)
            self.plan_time_budget()
            skipped += step_skipped
            steps_done += 1
            interval_steps += 1
            if loss is not None:
                loss_sum += loss
                interval_loss += loss
            bar.update(1)
            if p.step % cfg.log_every == 0:
                elapsed = time.perf_counter() - interval_start
                # The loss of the global batch: every rank reaches this line at the same step.
                interval_loss = all_reduce_sum(interval_loss) / self.dist.world_size
                metrics = {
                    "epoch": p.epoch + p.images_in_epoch / self.epoch_images,
                    "loss": float(interval_loss) / interval_steps,
                    "lr": self.lr,
                    "images_per_s": interval_steps * self.global_batch / max(elapsed, 1e-9),
                }
                run_left_s = (self.total_images - p.images_seen) / max(metrics["images_per_s"], 1e-9)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    lr=f"{metrics['lr']:.2e}",
                    img_s=f"{metrics['images_per_s']:.0f}",
                    run_left=format_duration(run_left_s),
                )
                self.logger.log(metrics, p.step)
                interval_loss.zero_()
                interval_steps, interval_start = 0, time.perf_counter()
        bar.close()
        totals = all_reduce_sum(torch.tensor([float(loss_sum), float(skipped)], device=self.device))
        epoch_metrics = {
            "epoch": p.epoch + 1,
            "train_loss": float(totals[0]) / self.dist.world_size / max(steps_done, 1),
            "skipped_images": int(totals[1]),
            "epoch_time_s": round(time.perf_counter() - epoch_start, 2),
        }
        p.epoch += 1
        p.images_in_epoch = 0
        if self.on_epoch_end is not None:
            epoch_metrics.update(self.on_epoch_end(p.epoch - 1))
        self.logger.log(epoch_metrics, p.step, prefix="epoch")
        if self.dist.is_main:
            summary = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in epoch_metrics.items()
            )
            tqdm.write(summary)
            if skipped := epoch_metrics["skipped_images"]:
                warnings.warn(f"{skipped} unreadable image(s) were skipped in epoch {p.epoch}", stacklevel=2)
        if p.epoch % cfg.save_every == 0 or p.epoch == cfg.epochs or self.finished:
            self.save()
        return False

    def optimizer_step(self, micro_batches) -> tuple[torch.Tensor | None, int]:
        """Accumulate `accum_iter` micro-batches and step. Returns (mean loss or None if skipped, skips)."""
        p, cfg = self.progress, self.cfg
        self.lr = self.lr_now()
        set_lr(self.optimizer, self.lr)
        total = torch.zeros((), device=self.device)
        skipped = 0
        for micro in range(cfg.accum_iter):
            images, labels, seeds, micro_skipped = next(micro_batches)
            skipped += micro_skipped
            if images.numel() == 0:
                continue
            last = micro == cfg.accum_iter - 1
            # DDP all-reduces only on the last micro-step. FSDP reduce-scatters on every one: skipping
            # it would keep whole (unsharded) gradients, the memory FSDP is there to save.
            ddp = self.dist.enabled and not self.sharded
            sync = self.train_model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync, gemm_context(self.device, cfg.precision):
                with autocast(self.device, cfg.precision):
                    loss, _ = self.task(self.train_model, (images, labels, seeds), self.device)
                self.scaler.scale(loss / cfg.accum_iter).backward()
            total += loss.detach() / cfg.accum_iter
        p.images_in_epoch += self.global_batch
        p.images_seen += self.global_batch
        p.step += 1
        nonfinite, self.stop_agreed = self.agree_on_flags(total)
        if not self.check_finite(nonfinite):
            self.optimizer.zero_grad(set_to_none=True)
            return None, skipped
        if self.schedule.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, skipped

    def agree_on_flags(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(non-finite loss on some rank, SIGTERM on some rank), the same on every rank.

        One small all-reduce per step, so all ranks skip the same steps and stop at the same one.
        """
        requested = torch.tensor(float(self.stop.requested), device=loss.device)
        nonfinite, stop = all_reduce_sum(torch.stack([(~torch.isfinite(loss)).float(), requested])).tolist()
        return nonfinite > 0, stop > 0

    def check_finite(self, nonfinite: bool) -> bool:
        """False (and a warning) after a non-finite loss; too many in a row stop the run."""
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        if self.dist.is_main:
            warnings.warn(f"non-finite loss at step {self.progress.step}: the step is skipped", stacklevel=2)
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (last at step {self.progress.step}); "
                "lower the learning rate, enable clip_grad, or use fp32"
            )
        return False
