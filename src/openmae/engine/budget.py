"""Fitting a run into a time budget (`time_budget_min`): how many images the schedule spans.

After a short calibration the planner measures the training rate and shortens the run to the
images that fit in the budget; it plans again after 2x, 4x, ... the steps, so a machine that slows
down (or speeds up) part-way is followed. Steps, not clocks, decide when to plan, so every rank
plans at the same step (the rate is averaged over the ranks). The plan never exceeds `epochs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from openmae.distributed import all_reduce_sum

CALIBRATION_STEPS = 10


class TimeBudget:
    """Plans `planned_images` for a budget of `minutes`.

    Args:
        minutes: the budget for the whole run, from the start of `fit` (a resumed run keeps the plan
            it was saved with and is not re-planned).
        max_images: the images of `epochs` full epochs: the plan's ceiling.
        global_batch: images per optimizer step over all ranks.
        world_size: ranks whose rates are averaged.
        log: called with a line when the plan changes by more than 2%.
    """

    def __init__(
        self,
        minutes: float,
        max_images: int,
        global_batch: int,
        world_size: int = 1,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.minutes = minutes
        self.max_images = max_images
        self.global_batch = global_batch
        self.world_size = world_size
        self.log = log or (lambda line: None)
        self.started = time.perf_counter()
        self.first_step = 0
        self.next_plan_step: int | None = None

    def start(self, step: int) -> None:
        """The run (re)starts at `step`: calibrate for the first steps, then plan."""
        self.started, self.first_step = time.perf_counter(), step
        self.next_plan_step = step + CALIBRATION_STEPS

    def plan(self, step: int, images_seen: int, planned_images: int, epoch_images: int) -> int:
        """The planned images after `step` (unchanged until a planning step comes)."""
        if self.next_plan_step is None or step < self.next_plan_step:
            return planned_images
        steps_run = step - self.first_step
        self.next_plan_step = self.first_step + 2 * steps_run
        elapsed = time.perf_counter() - self.started
        rate = torch.tensor(steps_run * self.global_batch / elapsed)
        rate = float(all_reduce_sum(rate)) / self.world_size  # the same plan on every rank
        fit = images_seen + rate * max(self.minutes * 60 - elapsed, 0)
        steps = max(int(min(fit, self.max_images)) // self.global_batch, 1)
        planned = max(steps * self.global_batch, images_seen)
        if abs(planned - planned_images) > 0.02 * planned:
            self.log(
                f"time budget {self.minutes:g} min at {rate:.0f} images/s: training for {planned} images "
                f"({planned / epoch_images:.2f} epochs)"
            )
        return planned
