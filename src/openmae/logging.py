"""Run logs: metrics as JSON lines and TensorBoard scalars/images, written by rank 0 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


class RunLogger:
    """Appends metrics to `metrics.jsonl` and TensorBoard in `out_dir`; silent when disabled."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._writer = None
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, metrics: dict, step: int, prefix: str = "train") -> None:
        """One JSON line `{"time", "step", ...metrics}`, and a TensorBoard scalar per number."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "step": step, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A `[3, H, W]` float image in [0, 1] to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._writer is not None:
                self._writer.close()
