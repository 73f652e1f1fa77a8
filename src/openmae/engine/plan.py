"""What a training run is asked to do (`TrainConfig`, `Schedule`) and where it is (`Progress`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from openmae.accel import AccelConfig
from openmae.engine.precision import Precision


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
    max_nonfinite: int = field(
        default=5, metadata={"help": "non-finite losses in a row that stop the run (checked at log steps)"}
    )
    output_dir: str = field(default="runs/run", metadata={"help": "folder for checkpoints, logs and config"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint path, or 'auto' for the newest"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "start afresh in an output_dir that holds a run (its files are removed)"},
    )
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
    accel: AccelConfig = field(default_factory=AccelConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_iter < 1:
            raise ValueError("epochs, batch_size and accum_iter must be at least 1")
        if self.log_every < 1 or self.save_every < 1 or self.max_nonfinite < 1:
            raise ValueError("log_every, save_every and max_nonfinite must be at least 1")


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
