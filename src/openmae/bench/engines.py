"""The contestants, each timed through the training loop users run (`engine.loop.Trainer`).

An engine is a model (openmae's MAE, the paper's mask-tokens-in-encoder baseline, or HuggingFace
ViTMAE with eager or SDPA attention) plus the loop's acceleration settings (`accel.*`). Every engine
starts from the same weights (the openmae model built with the run's seed, copied into HF's layout
by `openmae.interop.export_hf`), trains on the same images with the same masks (per-sample seeds,
as in training), with the optimizer `engine.optim.build_optimizer` makes for a pretraining run.
Only the model code and the execution paths differ.

Engine names: a base name from `ENGINES`, optionally with forced paths, e.g.
`openmae@attention=per_head,gemm=fp32` (any `accel.*` key).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from openmae.accel import AccelConfig, allocator, ranking
from openmae.accel.mlp import RecomputingMlp
from openmae.distributed import DistInfo
from openmae.engine.loop import Schedule, TrainConfig, Trainer
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.engine.tasks import PretrainTask, noise_from_seeds
from openmae.extras import require
from openmae.logging import RunLogger
from openmae.models import MAEConfig, MaskedAutoencoder, build_mae


@dataclass(frozen=True)
class EngineSpec:
    """One way of running a pretraining step.

    Attributes:
        name: row label in the results.
        library: "openmae" or "hf" (transformers' ViTMAEForPreTraining).
        attn: HF attention implementation ("eager" or "sdpa").
        mask_tokens: the `MaskTokensInEncoder` baseline (the paper's slow design).
        accel: the loop's `accel.*` settings for this engine.
        compile: the loop's `compile=true`.
        predict: what openmae's decoder predicts in training: "hidden" patches (the loop's
            default) or "all" of them (what the reference and HF compute).
        about: one line for the results.
    """

    name: str
    library: Literal["openmae", "hf"]
    attn: str = "sdpa"
    mask_tokens: bool = False
    accel: AccelConfig = field(default_factory=lambda: AccelConfig(cache=False))
    compile: bool = False
    predict: str = "hidden"
    about: str = ""


# The plain model: no openmae paths, the C allocator as the process found it.
_STOCK = AccelConfig(attention="sdpa", gemm="native", allocator="system", cache=False)
ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("openmae", "openmae", about="openmae, paths measured on this machine (accel=auto)"),
        EngineSpec("mask_tokens", "openmae", mask_tokens=True, about="openmae, mask tokens in encoder"),
        EngineSpec(
            "hf_eager", "hf", attn="eager", accel=_STOCK, about="HF ViTMAE, eager attention, autocast"
        ),
        EngineSpec("hf_sdpa", "hf", attn="sdpa", accel=_STOCK, about="HF ViTMAE, SDPA attention, autocast"),
        EngineSpec(
            "hf_eager_accel",
            "hf",
            attn="eager",
            about="HF eager + openmae's accel (CPU allocator, measured bf16 GEMM path)",
        ),
        EngineSpec(
            "hf_sdpa_accel",
            "hf",
            attn="sdpa",
            about="HF SDPA + openmae's accel (CPU allocator, measured bf16 GEMM path)",
        ),
        EngineSpec("openmae_plain", "openmae", accel=_STOCK, about="openmae's plain model: SDPA, autocast"),
        EngineSpec("openmae_compile", "openmae", compile=True, about="openmae + torch.compile (inductor)"),
        EngineSpec(
            "openmae_predict_all",
            "openmae",
            predict="all",
            about="openmae, its decoder predicting every patch, as the reference's and HF's do",
        ),
    )
}
HF_STOCK = ("hf_eager", "hf_sdpa")  # what an HF user gets: the bar for the targets
DEFAULT_PEERS = ("mask_tokens", "hf_eager", "hf_sdpa", "hf_eager_accel", "hf_sdpa_accel")
# Engines that differ from their stock twin in a bf16 path, and on a CPU in the allocator: on a GPU
# there is nothing to time in fp32.
BF16_ONLY_ON_GPU = ("hf_eager_accel", "hf_sdpa_accel")


def engine_spec(name: str) -> EngineSpec:
    """The spec of `name` or `base@key=value,...` (forced `accel.*` paths, e.g. `openmae@attention=eager`)."""
    base, _, forced = name.partition("@")
    if base not in ENGINES:
        raise ValueError(
            f"unknown engine {base!r}; choose from {sorted(ENGINES)} (optionally with @key=value)"
        )
    spec = ENGINES[base]
    if not forced:
        return spec
    changes = dict(item.split("=", 1) for item in forced.split(",") if "=" in item)
    unknown = sorted(set(changes) - set(AccelConfig.__dataclass_fields__))
    if unknown or len(changes) != len(forced.split(",")):
        raise ValueError(
            f"engine {name!r}: force paths as @key=value with keys of accel: "
            + ", ".join(AccelConfig.__dataclass_fields__)
        )
    accel = replace(spec.accel, **changes)
    return replace(spec, name=name, accel=accel, about=f"{spec.about}, forced {forced}")


def engines_for(names: list[str], precision: str, device_type: str = "cpu") -> list[EngineSpec]:
    """The engines to run for a precision, in order, without duplicates (on a GPU, the ones that
    differ from their twin only in bf16 are dropped in fp32)."""
    specs = [engine_spec(n) for n in dict.fromkeys(names)]
    same_as_twin = precision == "fp32" and device_type != "cpu"
    return [s for s in specs if not (same_as_twin and s.name in BF16_ONLY_ON_GPU)]


def build_model(spec: EngineSpec, config: MAEConfig, seed: int) -> nn.Module:
    """The engine's model with the run's shared weights (seeded openmae init, converted for HF)."""
    torch.manual_seed(seed)
    reference = MaskedAutoencoder(replace(config, encoder_mask_tokens=False))
    if spec.library == "hf":
        from openmae.interop import export_hf

        hf_config, state = export_hf(reference)
        # Set before building: the decoder copies the config, and `set_attn_implementation` after the
        # fact leaves the decoder on SDPA (transformers 5).
        hf_config._attn_implementation = spec.attn
        model = require("transformers").ViTMAEForPreTraining(hf_config)
        model.set_attn_implementation(spec.attn)
        model.load_state_dict(state, strict=True)
        return model
    if not spec.mask_tokens:
        return reference
    # The baseline shares every weight but the mask tokens (an encoder one replaces the decoder's).
    model = build_mae(replace(config, encoder_mask_tokens=True))
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    if missing != ["encoder_mask_token"] or unexpected != ["mask_token"]:
        raise RuntimeError(f"mask-token baseline: unexpected key mismatch {missing}, {unexpected}")
    return model


class HFPretrainTask(PretrainTask):
    """`PretrainTask` for HF ViTMAE: the same per-sample noise, passed as HF names it."""

    def __call__(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        images, _, seeds = batch
        noise = noise_from_seeds(seeds, self.grid_size[0] * self.grid_size[1], device)
        return model(pixel_values=images.to(device, non_blocking=True), noise=noise).loss


class FixedImages:
    """A `TrainFeed` of one batch of random images, with new per-sample seeds (so new masks) each
    step: the model's input without the data pipeline's cost."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.epoch_images = 2**62  # an endless epoch: the benchmark decides how many steps to run

    def batches(self, epoch: int, start: int) -> Iterator[tuple]:
        B = self.images.shape[0]
        labels = torch.zeros(B, dtype=torch.long)
        step = start // B
        while True:
            yield self.images, labels, torch.arange(step * B, (step + 1) * B), 0
            step += 1

    def close(self) -> None:
        pass


class BenchEngine:
    """One engine's training loop on a fixed batch: call `step()` to run one optimizer step.

    The step is `Trainer.train_step`, the one every pretraining run takes: the loop's
    precision, acceleration, non-finite guard and optimizer. It returns the (detached) loss without
    synchronising the device.
    """

    def __init__(
        self,
        spec: EngineSpec,
        config: MAEConfig,
        batch_size: int,
        device: torch.device | str,
        precision: str,
        seed: int = 0,
        fused_optimizer: bool = True,
    ) -> None:
        self.spec, self.device = spec, torch.device(device)
        model = build_model(spec, config, seed).to(self.device).train()
        cfg = TrainConfig(
            batch_size=batch_size,
            precision=precision,
            seed=seed,
            compile=spec.compile,
            accel=spec.accel,
            epochs=1,
        )
        optim = OptimConfig(fused=fused_optimizer, warmup_epochs=0)
        lr, _ = optim.peak_lr(batch_size)
        generator = torch.Generator().manual_seed(seed)
        C, (H, W) = config.in_chans, config.img_size
        images = torch.randn(batch_size, C, H, W, generator=generator)  # [B, C, H, W]
        task_class = HFPretrainTask if spec.library == "hf" else PretrainTask
        task = task_class(config.grid_size, config.mask_ratio, predict=spec.predict)
        self.trainer = Trainer(
            model,
            task,
            FixedImages(images),
            build_optimizer(model, optim, lr),
            Schedule(lr, 0.0, 0.0),
            cfg,
            DistInfo(device=self.device),
            RunLogger("unused", enabled=False),
        )
        self.batches = self.trainer.feed.batches(0, 0)
        self.model = model

    def step(self) -> torch.Tensor:
        loss, _, _ = self.trainer.train_step(self.batches)
        return loss

    def paths(self) -> dict[str, str]:
        """The execution paths the engine's loop chose (autotuner choices, MLPs, the C allocator);
        an attention kernel with what each candidate measured."""
        accel = self.trainer.accel
        paths = accel.state_dict()
        for entry, choice in paths.items():
            seconds = accel.tuner.seconds.get(entry)
            if entry.startswith("attention:") and seconds:
                paths[entry] = f"{choice} ({ranking(seconds)})"
        recomputing = sum(isinstance(m, RecomputingMlp) for m in self.model.modules())
        if recomputing:
            paths["mlp"] = f"GELU recomputed in backward ({recomputing} MLPs)"
        if self.trainer.accel.recast_weights:
            paths["weight casts"] = "low-precision weights cast again in backward"
        if self.trainer.accel.recompute_norms:
            paths["norms"] = "layer-norm outputs computed again in backward"
        if self.device.type == "cpu":
            paths["cpu allocator"] = "retain freed memory" if allocator.retaining() else "system"
        return paths


def step_flops(config: MAEConfig, mask_tokens: bool = False) -> int:
    """Matrix-multiply FLOPs of one training step's forward and backward pass, per image.

    Counted by torch's FlopCounterMode on the openmae model predicting every patch, the products
    HF's model does too (openmae's loop, predicting the hidden patches alone, skips 1-2% of them:
    the same count for every engine makes images/s and GFLOP/s comparable), with attention
    decomposed into matmuls so that it is counted too. The optimizer is not counted.
    """
    model = build_mae(replace(config, encoder_mask_tokens=mask_tokens))
    images = torch.randn(1, config.in_chans, *config.img_size)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(images).loss.backward()
    return counter.get_total_flops()


def optimizer_step_seconds(config: MAEConfig, fused: bool, steps: int = 3) -> float:
    """Median seconds of one AdamW step over the parameters of `config`'s model (random gradients)."""
    model = MaskedAutoencoder(config)
    optimizer = build_optimizer(model, OptimConfig(fused=fused), lr=1e-4)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the moment buffers
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
