"""Optimizers through timm's factory: weight-decay groups, layer-wise lr decay, LARS.

Parameters with one dimension (biases, norm weights) and the tokens a model names in
`no_weight_decay()` (cls, mask and position tokens) get no weight decay; frozen parameters are
left out. Layer decay reads the model's `group_matcher()`, as every timm ViT does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from openmae.engine.schedule import absolute_lr

LR_SCALINGS = ("linear", "sqrt")


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata={"help": "optimizer (timm name): adamw, lars, sgd, ..."})
    base_lr: float = field(
        default=1.5e-4, metadata={"help": "lr per 256 images, scaled to the effective batch by lr_scaling"}
    )
    lr: float | None = field(default=None, metadata={"help": "absolute lr; overrides base_lr when set"})
    lr_scaling: str = field(
        default="linear",
        metadata={
            "help": "linear: lr = base_lr x batch / 256 (the paper's) | sqrt: the same lr at "
            "reference_batch, x sqrt(batch / reference_batch) from there (Adam's rule: a small batch "
            "keeps a usable lr)"
        },
    )
    reference_batch: int = field(
        default=256, metadata={"help": "lr_scaling=sqrt: the batch at which it equals the linear rule"}
    )
    min_lr: float = field(default=0.0, metadata={"help": "floor of the cosine schedule"})
    weight_decay: float = field(
        default=0.05, metadata={"help": "decoupled weight decay (not on biases, norms, tokens)"}
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "Adam betas"})
    momentum: float = field(default=0.9, metadata={"help": "momentum for SGD / LARS"})
    layer_decay: float | None = field(default=None, metadata={"help": "layer-wise lr decay (e.g. 0.75)"})
    warmup_epochs: float = field(default=40.0, metadata={"help": "linear warm-up length in epochs"})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm to this value"})
    fused: bool = field(
        default=True,
        metadata={"help": "AdamW as one fused kernel per step (~4x faster step than per-tensor loops)"},
    )

    def __post_init__(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(
                f"optim.lr_scaling must be one of {', '.join(LR_SCALINGS)}; got {self.lr_scaling!r}"
            )
        if self.reference_batch < 1:
            raise ValueError(f"optim.reference_batch must be at least 1, got {self.reference_batch}")
        known = list_optimizers()
        if self.name not in known:
            close = difflib.get_close_matches(self.name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"optim.name {self.name!r} is not an optimizer timm knows{hint}")

    def peak_lr(self, effective_batch: int) -> tuple[float, str]:
        """The run's peak lr and where it came from, for the log: `optim.lr` when set, else `base_lr`
        scaled to the effective batch (`lr_scaling`)."""
        if self.lr is not None:
            return self.lr, f"lr {self.lr:.3g} (optim.lr; effective batch {effective_batch})"
        lr = absolute_lr(self.base_lr, effective_batch, self.lr_scaling, self.reference_batch)
        if self.lr_scaling == "linear":
            rule = f"base lr {self.base_lr:g} x effective batch {effective_batch} / 256"
        else:
            ref = self.reference_batch
            rule = (
                f"base lr {self.base_lr:g} x {ref} / 256 x sqrt(effective batch {effective_batch} / {ref}) "
                f"(optim.lr_scaling=sqrt; the linear rule at batch {ref})"
            )
        return lr, f"lr {lr:.3g} = {rule}"


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of `model` with decay groups (and layer decay)."""
    kwargs: dict = {}
    if cfg.name in ("adamw", "adam"):
        kwargs["betas"] = tuple(cfg.betas)
        if cfg.fused and fused_adamw_supported(model):
            kwargs["fused"] = True
    elif cfg.name in ("sgd", "momentum", "lars", "nlars"):
        kwargs["momentum"] = cfg.momentum
    return create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=lr,
        weight_decay=cfg.weight_decay,
        layer_decay=cfg.layer_decay,
        **kwargs,
    )


def fused_adamw_supported(model: nn.Module) -> bool:
    """Whether torch's fused AdamW kernel runs on every parameter's device (CPU, CUDA, XPU, MPS)."""
    return all(p.device.type in ("cpu", "cuda", "xpu", "mps") for p in model.parameters())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every group, honouring a per-group `lr_scale` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
