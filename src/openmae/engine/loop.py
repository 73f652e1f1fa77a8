"""The one training loop: pretraining, linear probing and fine-tuning all run through `Trainer`.

What differs between them is the `task` (a callable that turns a batch into a loss), the model, the
optimizer and the hooks (evaluations at epoch ends); the loop owns everything else, in four phases:

- `fit`: epochs until the planned images are seen (or `max_steps`, or a stop signal);
- `train_epoch`: this rank's micro-batches of one epoch, with a log line every `log_every` steps;
- `train_step` / `optimizer_step`: `accum_iter` forward/backward passes in the run's precision, then
  one update;
- `save` / `resume`: checkpoints that continue a run exactly (`engine.checkpointing`).

Scale-out is PyTorch's own: DDP (`no_sync` on non-final micro-steps) or FSDP2 (`fsdp=true`) under
torchrun. The host never waits for the device inside a step: non-finite losses are flagged on the
device (a fused AdamW skips the update there) and read at log intervals, and stop requests (SIGTERM,
Ctrl-C) are polled every few steps. See docs/distributed.md.

The file is a little over 400 lines on purpose: the phases stay together so that what happens in a
step reads top to bottom; planning (`plan`), time budgets (`budget`), checkpoints (`checkpointing`)
and metric tallies (`tallies`) have their own modules.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from openmae.accel import Acceleration
from openmae.data.feed import MapFeed, TrainFeed
from openmae.distributed import (
    DistInfo,
    GracefulStop,
    all_reduce_sum,
    is_peer_failure,
    peer_failure,
    shard_model,
    use_global_batch_norm,
)
from openmae.engine.budget import TimeBudget
from openmae.engine.checkpointing import RunCheckpointer
from openmae.engine.optim import set_lr
from openmae.engine.plan import Progress, Schedule, TrainConfig
from openmae.engine.precision import autocast, check_precision
from openmae.engine.schedule import fitted_warmup, warmup_cosine_lr
from openmae.engine.tallies import EpochTotals, check_readable, format_duration
from openmae.errors import DivergedError
from openmae.logging import RunLogger

# Under torchrun, ranks agree on a stop request (one all-reduce) every this many steps.
STOP_POLL_STEPS = 10


class Task(Protocol):
    """Turns a batch `(images, labels, seeds)` into a scalar loss."""

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor: ...


class Hook:
    """Work at fixed points of a run (evaluations, pictures, weight averages); the trainer is passed in."""

    def after_step(self, trainer: Trainer) -> None:
        """Called on every rank after each optimizer step (keep it light: it is on the hot path)."""

    def after_epoch(self, trainer: Trainer, epoch: int) -> dict:
        """Called on every rank after epoch `epoch` (0-based); returns metrics to log."""
        return {}

    def after_fit(self, trainer: Trainer) -> None:
        """Called on every rank when training ends (finished or stopped)."""


class NonFiniteLossError(DivergedError):
    """Too many non-finite losses in a row: the run diverged (not an input error)."""


class Trainer:
    """Runs `task` over `data` for `cfg.epochs`, stepping `optimizer` on `model`.

    Args:
        model: the single-device model, on its device (wrapped in DDP here when the run is distributed,
            or sharded in place with `cfg.fsdp`).
        task: the loss of a batch.
        data: a map-style dataset of `(image, label)` items (None: unreadable), or a `TrainFeed`.
        optimizer: built over `model`'s parameters, not stepped yet.
        schedule: peak/min lr, warm-up and clipping.
        cfg: the loop's part of the run config.
        dist: rank, world size and device.
        logger: metrics sink (rank 0 writes).
        num_workers: data-loading processes (map-style data).
        metadata: strings stored with every checkpoint's weights (config, target...).
        hooks: called after each epoch and at the end, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: Dataset | TrainFeed,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        cfg: TrainConfig,
        dist: DistInfo,
        logger: RunLogger,
        num_workers: int = 0,
        metadata: dict[str, str] | None = None,
        hooks: list[Hook] | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.task = task
        self.optimizer = optimizer
        self.schedule = schedule
        self.logger = logger
        self.hooks = list(hooks or [])
        self.model = model  # without the DDP / compile wrappers: checkpoints, evaluation
        self.global_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
        self.feed = data if hasattr(data, "batches") else self._map_feed(data, num_workers)
        if self.feed.epoch_images == 0:
            raise ValueError(
                f"the training data is smaller than one global batch ({self.global_batch} images)"
            )
        check_precision(cfg.precision, self.device)
        self.accel = Acceleration(cfg.accel, self.device, cfg.precision)
        # FSDP needs a process group; in a single process `fsdp` changes nothing.
        self.sharded = cfg.fsdp and dist.enabled
        self.train_model = self._wrap(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        # A fused Adam(W) skips a step with a non-finite loss on the device; others need the host.
        device_skip = getattr(optimizer, "_step_supports_amp_scaling", False)
        self.skips_on_device = device_skip and not self.scaler.is_enabled()
        self.progress = Progress()
        self.nonfinite_in_a_row = torch.zeros((), device=self.device)
        self.nonfinite_since_log = torch.zeros((), device=self.device)
        self.stop = GracefulStop()
        self.stop_agreed = False  # some rank got a stop signal: all stop after this step
        self.checkpointer = RunCheckpointer(cfg.output_dir, cfg.keep_last, metadata or {}, dist)
        self.budget: TimeBudget | None = None
        self.warned_warmup = False

    def _map_feed(self, dataset: Dataset, num_workers: int) -> MapFeed:
        return MapFeed(
            dataset,
            self.cfg.batch_size,
            self.global_batch,
            seed=self.cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if self.dist.enabled:
            # BatchNorm (the linear probe's head) normalises with the global batch, as in one process.
            use_global_batch_norm(model)
        if self.sharded:
            if self.cfg.precision == "fp16":
                raise ValueError("fsdp runs in fp32 or bf16 (the fp16 grad scaler does not see shards)")
            shard_model(model, self.optimizer, self.device)  # in place: self.model is sharded too
            self.accel.keep_weight_recipes(
                "under FSDP, which frees and gathers the weights between forward and backward"
            )
        if self.cfg.compile:
            self.accel.gemm = None  # inductor compiles the step; Python function modes do not mix with it
            self.accel.keep_weight_recipes("under torch.compile (its graphs take no saved-tensor hooks)")
            self.accel.install_residual(model)
            return self._ddp(torch.compile(model))
        self.accel.install(model)
        return self._ddp(model)

    def _ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled or self.sharded:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        # Gradients as views into the all-reduce buckets: one copy of them instead of two.
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def say(self, line: str) -> None:
        """A line on the console, from rank 0 alone (it keeps progress bars intact)."""
        if self.dist.is_main:
            tqdm.write(line)

    # ----------------------------------------------------------------------------------------
    # Plan and schedule

    @property
    def epoch_images(self) -> int:
        return self.feed.epoch_images

    @property
    def total_images(self) -> int:
        return self.progress.planned_images or self.cfg.epochs * self.epoch_images

    @property
    def finished(self) -> bool:
        """All planned images seen (epochs done, or the time budget used)."""
        return self.progress.images_seen >= self.total_images

    def lr_now(self) -> float:
        s = self.schedule
        asked = s.warmup_epochs * self.epoch_images
        warmup = fitted_warmup(asked, self.total_images)
        if warmup != asked and not self.warned_warmup:
            self.warned_warmup = True
            self.say(
                f"warning: warmup_epochs {s.warmup_epochs:g} is {asked / self.total_images:.0%} of this "
                f"{self.total_images / self.epoch_images:.3g}-epoch run: warming up for "
                f"{warmup / self.epoch_images:.3g} epochs (5% of the run, the paper's share) instead"
            )
        return warmup_cosine_lr(self.progress.images_seen, self.total_images, warmup, s.peak_lr, s.min_lr)

    # ----------------------------------------------------------------------------------------
    # Save and resume

    def resume(self, weights) -> None:
        """Continue from a checkpoint written by `save` (any world size, with or without FSDP)."""
        state = self.checkpointer.load(weights, self.model, self.optimizer, self.scaler)
        self.progress = Progress(**state["progress"])
        self.accel.load_state_dict(state.get("accel", {}))
        if self.progress.images_in_epoch % self.global_batch:
            raise ValueError(
                f"cannot resume mid-epoch at image {self.progress.images_in_epoch} with a global batch of "
                f"{self.global_batch}; resume with a batch that divides it, or from an epoch-end checkpoint"
            )

    def save(self):
        """Checkpoint the current progress. Every rank calls (FSDP gathers the shards); rank 0 writes."""
        extra = {"progress": vars(self.progress).copy(), "accel": self.accel.state_dict()}
        return self.checkpointer.save(self.progress.step, self.model, self.optimizer, self.scaler, extra)

    def save_weights(self, path):
        """Write the model's weights alone (every rank calls; rank 0 writes and returns the path)."""
        return self.checkpointer.save_weights(path, self.model)

    # ----------------------------------------------------------------------------------------
    # The run

    def fit(self) -> Progress:
        """Train until the planned images are seen (or `max_steps`); checkpoint on the way and at a stop.

        SIGTERM or Ctrl-C (see `GracefulStop`) ends the run after the current step, on every rank at
        the same step, with a checkpoint to resume from.
        """
        if self.cfg.time_budget_min and not self.progress.planned_images:
            self.budget = TimeBudget(
                self.cfg.time_budget_min,
                self.cfg.epochs * self.epoch_images,
                self.global_batch,
                self.dist.world_size,
                log=self.say,
            )
            self.budget.start(self.progress.step)
        try:
            with self.stop:
                while self.progress.epoch < self.cfg.epochs and not self.finished:
                    if self.train_epoch():
                        self.save()
                        break
        except RuntimeError as error:
            if self.dist.enabled and is_peer_failure(error):
                raise peer_failure(self.dist.rank, error) from error
            raise
        finally:
            self.feed.close()
        if self.stopped_by_signal:
            signal_name = self.stop.received.name if self.stop.received else "a signal to another rank"
            self.say(
                f"stopped by {signal_name} at step {self.progress.step}; checkpoint: "
                f"{self.checkpointer.saved_path}; run the same command with resume=auto to continue"
            )
        for hook in self.hooks:
            hook.after_fit(self)
        return self.progress

    @property
    def stopped_by_signal(self) -> bool:
        return self.stop_agreed and not self.finished

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps

    def train_epoch(self) -> bool:
        """One epoch (or its remainder after a resume). Returns True when the run must stop early."""
        p, cfg = self.progress, self.cfg
        self.train_model.train()
        images_left = min(self.epoch_images - p.images_in_epoch, self.total_images - p.images_seen)
        bar = tqdm(
            total=images_left // self.global_batch,
            desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
            leave=False,
        )
        epoch = EpochTotals(self.device, self.dist.world_size)
        interval = EpochTotals(self.device, self.dist.world_size)
        interval_start = time.perf_counter()
        micro_batches = self.feed.batches(p.epoch, p.images_in_epoch)
        while p.images_in_epoch < self.epoch_images and not self.finished:
            if self.reached_max_steps() or self.stop_requested():
                bar.close()
                return True
            loss, finite, skipped = self.train_step(micro_batches)
            epoch.add(loss, finite, skipped, self.global_batch)
            interval.add(loss, finite, skipped, self.global_batch)
            if self.budget is not None:
                p.planned_images = self.budget.plan(
                    p.step, p.images_seen, p.planned_images, self.epoch_images
                )
            bar.update(1)
            for line in self.accel.report():  # what the first steps measured, once
                self.say(line)
            if p.step % cfg.log_every == 0:
                self.log_interval(interval, time.perf_counter() - interval_start, bar)
                interval, interval_start = EpochTotals(self.device, self.dist.world_size), time.perf_counter()
        bar.close()
        self.end_epoch(epoch)
        return False

    def stop_requested(self) -> bool:
        """Whether some rank got a stop signal; ranks agree every `STOP_POLL_STEPS` steps."""
        if not self.dist.enabled:
            self.stop_agreed = self.stop.requested
        elif self.progress.step % STOP_POLL_STEPS == 0:
            flag = torch.tensor(float(self.stop.requested), device=self.device)
            self.stop_agreed = bool(all_reduce_sum(flag) > 0)
        return self.stop_agreed

    def train_step(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step and what follows it (the fast paths' bookkeeping, the hooks)."""
        result = self.optimizer_step(micro_batches)
        self.accel.after_step()
        for hook in self.hooks:
            hook.after_step(self)
        return result

    def optimizer_step(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Accumulate `accum_iter` micro-batches and step. Returns (mean loss, finite flag, skipped images),
        the first two on the device: nothing here waits for it."""
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
            total += self.forward_backward((images, labels, seeds), last=micro == cfg.accum_iter - 1)
        p.images_in_epoch += self.global_batch
        p.images_seen += self.global_batch
        p.step += 1
        finite = self.all_finite(total)
        self.nonfinite_in_a_row = torch.where(finite, 0.0, self.nonfinite_in_a_row + 1)
        self.nonfinite_since_log += (~finite).float()
        self.update(finite)
        return torch.where(finite, total, 0.0), finite, skipped

    def all_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether the loss is finite on every rank (a device flag): all ranks then skip the same
        steps, since one rank's NaN reaches every rank's gradients through the all-reduce."""
        if not self.dist.enabled:
            return torch.isfinite(loss)
        return all_reduce_sum((~torch.isfinite(loss)).float()) == 0

    def forward_backward(self, batch: tuple, last: bool) -> torch.Tensor:
        """One micro-step; returns its detached loss share (`loss / accum_iter`)."""
        # DDP all-reduces only on the last micro-step. FSDP reduce-scatters on every one: skipping
        # it would keep whole (unsharded) gradients, the memory FSDP is there to save.
        ddp = self.dist.enabled and not self.sharded
        sync = self.train_model.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync, self.accel.step():
            with autocast(self.device, self.cfg.precision, self.accel.autocast_cache):
                loss = self.task(self.train_model, batch, self.device) / self.cfg.accum_iter
            self.scaler.scale(loss).backward()
        return loss.detach()

    def update(self, finite: torch.Tensor) -> None:
        """Clip and step (skipped when the loss is not finite), then clear the gradients."""
        if self.schedule.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.schedule.clip_grad)
        if self.skips_on_device:
            self.optimizer.found_inf = (~finite).float()  # read by the fused kernel: no host sync
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(finite):  # the host decides: one sync per step for optimizers without the device skip
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def log_interval(self, interval: EpochTotals, elapsed: float, bar: tqdm) -> None:
        """The log line of the last `log_every` steps; checks the non-finite losses (a host sync)."""
        p = self.progress
        # The loss of the global batch: every rank reaches this line at the same step.
        loss_sum, finite_steps, _ = interval.reduced()
        self.check_nonfinite(int(self.nonfinite_since_log))
        metrics = {
            "epoch": p.epoch + p.images_in_epoch / self.epoch_images,
            "loss": loss_sum / max(finite_steps, 1),
            "lr": self.lr,
            "images_per_s": interval.images / max(elapsed, 1e-9),
        }
        run_left_s = (self.total_images - p.images_seen) / max(metrics["images_per_s"], 1e-9)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['lr']:.2e}",
            img_s=f"{metrics['images_per_s']:.0f}",
            run_left=format_duration(run_left_s),
        )
        self.logger.log(metrics, p.step)

    def check_nonfinite(self, since_log: int) -> None:
        """Warn of skipped steps; too many non-finite losses in a row stop the run."""
        self.nonfinite_since_log.zero_()
        if not since_log:
            return
        in_a_row = int(self.nonfinite_in_a_row)  # the same on every rank (see `all_finite`)
        if self.dist.is_main:
            warnings.warn(
                f"{since_log} non-finite loss(es) before step {self.progress.step}: those steps were skipped",
                stacklevel=3,
            )
        if in_a_row >= self.cfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{in_a_row} non-finite losses in a row (up to step {self.progress.step}); "
                "lower the learning rate, enable clip_grad, or use fp32"
            )

    def end_epoch(self, totals: EpochTotals) -> None:
        """Epoch summary, unreadable-data checks, hooks, checkpoint."""
        p, cfg = self.progress, self.cfg
        loss_sum, finite_steps, skipped = totals.reduced()
        self.check_nonfinite(int(self.nonfinite_since_log))
        check_readable(skipped, totals.images, p.epoch + 1)
        metrics = {
            "epoch": p.epoch + 1,
            "train_loss": loss_sum / max(finite_steps, 1),
            "skipped_images": skipped,
            "epoch_time_s": round(time.perf_counter() - totals.started, 2),
        }
        p.epoch += 1
        p.images_in_epoch = 0
        for hook in self.hooks:
            metrics.update(hook.after_epoch(self, p.epoch - 1))
        for line in self.accel.report():  # e.g. attention shapes an evaluation met
            self.say(line)
        self.logger.log(metrics, p.step, prefix="epoch")
        self.say(
            ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        )
        if skipped and self.dist.is_main:
            warnings.warn(f"{skipped} unreadable image(s) were skipped in epoch {p.epoch}", stacklevel=2)
        if p.epoch % cfg.save_every == 0 or p.epoch == cfg.epochs or self.finished:
            self.save()
