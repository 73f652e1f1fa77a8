"""Opt-in speed: faster attention kernels and bf16 GEMM paths, chosen by measuring them here,
and a C allocator that keeps a CPU step's memory for the next.

The model code (`openmae.models`) is plain PyTorch: attention is `scaled_dot_product_attention`,
matrix products are whatever autocast runs. `Acceleration`, which the training loop builds for its
device and precision, swaps in what measures faster on this machine for the shapes the run meets
(`attention`, `gemm`, timed by `tuner`), and every path is tested against the plain one. A config
section (`accel.attention`, `accel.gemm`) forces any one path; `sdpa` + `native` is the plain model.
Its MLPs recompute their GELU in backward instead of keeping its output (`mlp`: bit-identical
results, less activation memory), its matrix products keep a layer norm's input instead of its
output (`norm`, likewise), and under autocast backward casts the weights again instead of
keeping their low-precision copies if asked (`weight_casts=recompute`, likewise). On a CPU it also sets the
process's C allocator to reuse freed memory (`allocator`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from openmae import hardware
from openmae.accel.allocator import ALLOCATOR_CHOICES, retain_freed_memory
from openmae.accel.attention import ATTENTION_PATHS, KEEPING_PROBABILITIES_HANDICAP, TunedAttention
from openmae.accel.gemm import GEMM_PATHS, Bf16Gemm, Census, dispatch_overhead_s, release_fp32_workspace
from openmae.accel.mlp import MLP_CHOICES, recompute_mlps
from openmae.accel.norms import NORM_CHOICES, norm_outputs, note_norm_inputs
from openmae.accel.residual import RESIDUAL_CHOICES, lowp_residual
from openmae.accel.saved import cast_seconds, parameter_casts, rebuilt_weights, recipes
from openmae.accel.tuner import NOISE, Autotuner, Measurement, default_cache_file
from openmae.models.layers import Attention

WEIGHT_CAST_CHOICES = ("auto", "recompute", "keep")
# Under weight_casts=auto backward casts the large weights again from the first step, and keeps doing
# so if that costs at most this share of a step (measured once, on the third step: the first one
# times the paths). ViT-B/16 under bf16: 224 MB of weight copies; their casts took ~20 ms, 0.4% of a
# step on an AVX2 CPU and ~2.5% on an AVX512-BF16 one.
RECAST_STEP_SHARE = 0.01


@dataclass
class AccelConfig:
    """How the training loop picks its fast paths."""

    attention: str = field(
        default="auto",
        metadata={
            "help": "attention kernel: auto (the fastest, measured per shape; one that keeps the "
            "attention probabilities for backward must be a quarter faster) | lean (the fastest of "
            "those that keep no attention probabilities for backward) | " + " | ".join(ATTENTION_PATHS[2:])
        },
    )
    gemm: str = field(
        default="auto",
        metadata={"help": "bf16 matrix products on the CPU: auto (measured per shape) | native | fp32"},
    )
    allocator: str = field(
        default="auto",
        metadata={
            "help": "C allocator on a CPU: auto (keep freed memory for the next step, where glibc "
            "allows) | retain (required) | system (leave it as it is)"
        },
    )
    residual: str = field(
        default="fp32",
        metadata={
            "help": "residual stream under autocast: fp32 (autocast's) | lowp (the autocast dtype: "
            "faster, one rounding per residual add; off by default as it changes the numbers)"
        },
    )
    mlp: str = field(
        default="recompute",
        metadata={
            "help": "MLP activations kept for backward: recompute (fc1's output only; GELU's output is "
            "computed again in backward, bit-identical, a quarter less activation memory) | plain"
        },
    )
    norm: str = field(
        default="keep",
        metadata={
            "help": "layer-norm outputs for backward: keep (the products keep them) | recompute (the "
            "products keep the norm's input, which it keeps anyway, and backward normalises again, "
            "bit-identical; ViT-B/16 at batch 8: 80 MB fewer saved in fp32, 40 MB in bf16, for ~1% "
            "of a CPU step)"
        },
    )
    weight_casts: str = field(
        default="auto",
        metadata={
            "help": "low-precision weight copies under autocast: auto (recompute while that costs at "
            "most 1% of a step, measured on the third step; keep otherwise) | keep (autocast's: cast "
            "once in forward and kept for backward) | recompute (cast again from the fp32 weights in "
            "backward, bit-identical; ViT-B/16: ~150 MB less peak memory for 0.4-5% of a bf16 step)"
        },
    )
    cache: bool = field(
        default=True,
        metadata={"help": "remember measured choices for this machine in $OPENMAE_CACHE_DIR/autotune.json"},
    )

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(
                f"accel.attention must be one of {', '.join(ATTENTION_PATHS)}; got {self.attention!r}"
            )
        if self.gemm not in GEMM_PATHS:
            raise ValueError(f"accel.gemm must be one of {', '.join(GEMM_PATHS)}; got {self.gemm!r}")
        if self.allocator not in ALLOCATOR_CHOICES:
            raise ValueError(
                f"accel.allocator must be one of {', '.join(ALLOCATOR_CHOICES)}; got {self.allocator!r}"
            )
        if self.mlp not in MLP_CHOICES:
            raise ValueError(f"accel.mlp must be one of {', '.join(MLP_CHOICES)}; got {self.mlp!r}")
        if self.norm not in NORM_CHOICES:
            raise ValueError(f"accel.norm must be one of {', '.join(NORM_CHOICES)}; got {self.norm!r}")
        if self.weight_casts not in WEIGHT_CAST_CHOICES:
            choices = ", ".join(WEIGHT_CAST_CHOICES)
            raise ValueError(f"accel.weight_casts must be one of {choices}; got {self.weight_casts!r}")
        if self.residual not in RESIDUAL_CHOICES:
            raise ValueError(
                f"accel.residual must be one of {', '.join(RESIDUAL_CHOICES)}; got {self.residual!r}"
            )


# Said once when every matrix product measured slower in native bf16 than as fp32 GEMMs (CPUs
# without bf16 matrix units): bf16 then rounds the products' inputs and wins no time.
NO_FASTER_BF16_PRODUCTS = (
    "accel: no matrix product measured faster in native bf16 than in fp32 on this CPU: bf16 saves "
    "memory here, not time, and precision=fp32 may well train faster"
)


class Acceleration:
    """The fast paths of one run on one device and precision.

    `install(model)` gives every openmae attention layer the tuned kernel, every MLP its GELU
    recomputed in backward (`mlp=recompute`), every layer norm the hook that lets backward
    normalise again (`norm=recompute`) and, with `residual=lowp`, every block its input in the
    autocast dtype; `step()` is the context a training step (forward and backward) runs in: the
    bf16 GEMM mode for bf16 on a CPU, the layer-norm outputs and the weight casts rebuilt in
    backward (`weight_casts=recompute`, bf16 and fp16), and the forward's autocast then casts each
    weight where it is used, without its cache (`autocast_cache`).
    `state_dict()` holds the choices made, which a resumed run restores so that it
    computes exactly as before.
    """

    def __init__(
        self,
        cfg: AccelConfig,
        device: torch.device,
        precision: str,
        tuner: Autotuner | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.tuner = tuner or Autotuner(default_cache_file() if cfg.cache else None)
        self.attention = TunedAttention(self.tuner, cfg.attention)
        on_cpu_bf16 = precision == "bf16" and self.device.type == "cpu"
        self.gemm = Bf16Gemm(self.tuner, cfg.gemm) if on_cpu_bf16 and cfg.gemm != "native" else None
        # With accel.gemm=auto the mode itself is measured: after a step whose shapes are all timed,
        # it stays only if what it saves exceeds what its dispatch costs ("on" / "off").
        self.gemm_mode = "on" if cfg.gemm == "fp32" else None
        # Both off under FSDP and torch.compile (the loop calls `keep_weight_recipes`).
        self.cast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.recast_weights = cfg.weight_casts != "keep" and self.cast_dtype is not None
        self.weight_casts_decided = cfg.weight_casts != "auto"  # auto: measured on the third step
        self.rebuilt: list[nn.Parameter] = []  # the weights whose casts backward would rebuild
        self.batch_layout: tuple[int, ...] | None = None  # the first forward's input, for the decision
        self.warm_step_started = 0.0
        self.recompute_norms = cfg.norm == "recompute"
        self.steps = 0
        self.pending: list[str] = []
        allocator = retain_freed_memory(cfg.allocator, self.device.type)
        if allocator is not None:
            self.pending.append(allocator)

    def install(self, model: nn.Module) -> int:
        """Set the tuned kernel on every openmae `Attention` of `model`; returns how many."""
        self.install_residual(model)
        self.install_mlp(model)
        if self.recompute_norms:  # without a layer norm the rule would only cost its calls
            self.recompute_norms = bool(note_norm_inputs(model))
        # Without a weight large enough to rebuild, the hooks would only cost their calls.
        self.rebuilt = rebuilt_weights(model)
        self.recast_weights &= bool(self.rebuilt)
        if self.recast_weights and not self.weight_casts_decided:
            hook = model.register_forward_pre_hook(lambda module, args: self.note_batch(args, hook))
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for layer in layers:
            layer.kernel = self.attention
        return len(layers)

    def install_residual(self, model: nn.Module) -> None:
        """With `residual=lowp`, every openmae block of `model` takes its input in the autocast dtype."""
        if self.cfg.residual == "lowp":
            lowp_residual(model)

    def install_mlp(self, model: nn.Module) -> None:
        """With `mlp=recompute`, every MLP of `model` recomputes its GELU in backward, unless the
        model checkpoints its blocks (which then keep nothing of the MLP anyway)."""
        if self.cfg.mlp != "recompute":
            return
        if not any(getattr(m, "grad_checkpointing", False) for m in model.modules()):
            recompute_mlps(model)

    def step(self) -> contextlib.AbstractContextManager:
        """Enter around forward *and* backward."""
        stack = contextlib.ExitStack()
        if self.gemm is not None and self.gemm_mode != "off":
            stack.enter_context(self.gemm)
        rules = [parameter_casts] if self.recast_weights else []
        rules += [norm_outputs] if self.recompute_norms else []
        if rules:
            stack.enter_context(recipes(*rules))
        return stack

    def keep_weight_recipes(self, why: str) -> None:
        """Turn off what backward would rebuild from the weights (`weight_casts=recompute`,
        `norm=recompute`) where it cannot work, and say so in the next report."""
        if self.recast_weights and self.cfg.weight_casts == "recompute":
            self.pending.append(f"accel: weight_casts=recompute is off {why}; autocast keeps its casts")
        if self.recompute_norms:
            self.pending.append(f"accel: norm=recompute is off {why}; the products keep the norms' outputs")
        self.recast_weights = self.recompute_norms = False
        self.weight_casts_decided = True

    @property
    def autocast_cache(self) -> bool:
        """Whether autocast may keep its casts of the weights for the whole forward: not when
        backward rebuilds them, which would then free nothing before backward."""
        return not self.recast_weights

    def after_step(self) -> None:
        """The training loop calls this after every optimizer step: the bf16 GEMM mode is kept or
        dropped after the second step (the first one timed the shapes), and under `weight_casts=auto`
        what rebuilding the weight casts costs is weighed against the third."""
        self.steps += 1
        self.decide_gemm_mode()
        self.decide_weight_casts()

    def decide_gemm_mode(self) -> None:
        """Count the second step's GEMM dispatch calls, and keep the mode if its products save more."""
        if self.gemm is None or self.gemm_mode is not None:
            return
        if self.steps == 1:
            self.gemm.census = Census()
        elif self.steps == 2:
            census, self.gemm.census = self.gemm.census, None
            self.gemm_mode = self.tuner.settle(
                "bf16 gemm dispatch", census.key(), lambda: self.weigh_gemm_mode(census)
            )
            if self.gemm_mode == "off":
                release_fp32_workspace()

    def weigh_gemm_mode(self, census: Census) -> tuple[str, dict[str, float]]:
        """The mode ("on" / "off") and, per step, what each costs: "off" the seconds the measured
        paths would save, "on" the mode's dispatch (nothing when the choices were restored without
        their timings: then the mode follows them)."""
        saved = self.gemm.saving_per_step(census)
        if saved is None:
            return ("on" if "fp32" in self.gemm.chosen.values() else "off"), {}
        if set(self.gemm.chosen.values()) == {"fp32"}:
            self.pending.append(NO_FASTER_BF16_PRODUCTS)
        overhead = census.ops * dispatch_overhead_s()
        return ("on" if saved > overhead else "off"), {"off": saved, "on": overhead}

    def note_batch(self, args: tuple, hook: torch.utils.hooks.RemovableHandle) -> None:
        """The layout of the first forward's input (a forward pre-hook, removed after one call)."""
        hook.remove()
        if args and isinstance(args[0], torch.Tensor):
            self.batch_layout = tuple(args[0].shape)

    def decide_weight_casts(self) -> None:
        """Under `weight_casts=auto`: time the third step, and keep rebuilding the weight casts in
        backward only if casting the weights once costs at most `RECAST_STEP_SHARE` of it. The two
        waits for the device here are the only ones of the run. The decision is remembered for the
        weights and the batch (the tuner's cache file), so that a later run on the machine takes it
        after its first step without measuring: near the line it could go either way."""
        if self.weight_casts_decided or not (self.recast_weights and self.rebuilt):
            return
        elements = sum(w.numel() for w in self.rebuilt)
        key = f"{len(self.rebuilt)} weights, {elements} elements, batch {self.batch_layout}"
        if self.steps == 1:
            remembered = self.tuner.remembered("weight casts", key)
            if remembered is not None:
                self.recast_weights, self.weight_casts_decided = remembered == "recompute", True
        elif self.steps == 2:
            hardware.synchronize()
            self.warm_step_started = time.perf_counter()
        elif self.steps == 3:
            hardware.synchronize()
            step_s = time.perf_counter() - self.warm_step_started
            choice = self.tuner.settle("weight casts", key, lambda: self.weigh_weight_casts(step_s))
            self.recast_weights, self.weight_casts_decided = choice == "recompute", True

    def weigh_weight_casts(self, step_s: float) -> tuple[str, dict[str, float]]:
        """Rebuild ("recompute") or "keep" the weight casts, by what casting the weights once costs
        against a step of `step_s` seconds."""
        cast_s = cast_seconds(self.rebuilt, self.cast_dtype)
        rebuilt = cast_s <= RECAST_STEP_SHARE * step_s
        verdict = "rebuilt in backward" if rebuilt else "kept for backward"
        self.pending.append(
            f"accel: weight casts {verdict}: "
            f"casting the {len(self.rebuilt)} large weights again costs {1e3 * cast_s:.3g} ms, "
            f"{cast_s / step_s:.1%} of a {1e3 * step_s:.4g} ms step (auto rebuilds them up to "
            f"{RECAST_STEP_SHARE:.0%})"
        )
        return ("recompute" if rebuilt else "keep"), {"step": step_s, "casts": cast_s}

    def report(self) -> list[str]:
        """Lines on the choices measured since the last report: one per attention shape, one for
        all the bf16 matrix products (what the chosen paths cost a step, against each path alone)."""
        measured = self.tuner.take_measured()
        lines, self.pending = self.pending, []
        lines += [
            f"accel: attention {m.key}: {m.choice} ({ranking(m.seconds)}){_handicapped(m)}"
            for m in measured
            if m.kind == "attention"
        ]
        lines += [
            f"accel: bf16 GEMM dispatch {m.choice}: the measured paths save {1e3 * m.seconds['off']:.3g} ms "
            f"a step, the mode costs {1e3 * m.seconds['on']:.3g} ms ({m.key})"
            for m in measured
            if m.kind == "bf16 gemm dispatch" and m.seconds
        ]
        gemms = [m for m in measured if m.kind == "bf16 gemm"]
        if gemms:
            counts = {name: sum(m.choice == name for m in gemms) for name in ("native", "fp32")}
            cost = {name: sum(m.seconds[name] for m in gemms) for name in ("native", "fp32")}
            chosen = sum(m.seconds[m.choice] for m in gemms)
            lines.append(
                f"accel: bf16 matrix products, {len(gemms)} shapes measured: native for {counts['native']}, "
                f"fp32 for {counts['fp32']} (one run of each: {1e3 * chosen:.3g} ms as chosen, "
                f"{1e3 * cost['native']:.3g} ms all native, {1e3 * cost['fp32']:.3g} ms all fp32)"
            )
        return lines

    def state_dict(self) -> dict[str, str]:
        state = self.tuner.state_dict()
        if self.gemm is not None and self.gemm_mode is not None:
            state["bf16 gemm:dispatch"] = self.gemm_mode
        if self.cfg.weight_casts == "auto" and self.weight_casts_decided and self.rebuilt:
            state["weight casts"] = "recompute" if self.recast_weights else "keep"
        return state

    def load_state_dict(self, choices: dict[str, str]) -> None:
        """A resumed run's choices: the same paths, and the same decision on the GEMM mode."""
        choices = dict(choices)
        mode = choices.pop("bf16 gemm:dispatch", None)
        if mode is not None and self.cfg.gemm == "auto":
            self.gemm_mode = mode
        casts = choices.pop("weight casts", None)
        if casts is not None and not self.weight_casts_decided:
            self.recast_weights &= casts == "recompute"
            self.weight_casts_decided = True
        self.tuner.load_state_dict(choices)


def _handicapped(measurement: Measurement) -> str:
    """Why a kernel slower than the fastest was chosen: the faster ones keep the probabilities."""
    seconds = measurement.seconds
    if seconds[measurement.choice] <= min(seconds.values()) * (1 + NOISE):
        return ""
    return (
        f"; the faster keep [B, heads, N, N] probabilities for backward and are not "
        f"{KEEPING_PROBABILITIES_HANDICAP:.0%} faster (accel.attention=<kernel> forces one)"
    )


def ranking(seconds: dict[str, float]) -> str:
    """Candidates from the fastest, with their milliseconds per run."""
    return ", ".join(
        f"{name} {1e3 * s:.3g} ms" for name, s in sorted(seconds.items(), key=lambda item: item[1])
    )


def uninstall(model: nn.Module) -> None:
    """Put the plain SDPA kernel back on every attention layer of `model`."""
    from openmae.models.layers import sdpa_attention

    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = sdpa_attention


__all__ = ["ATTENTION_PATHS", "GEMM_PATHS", "AccelConfig", "Acceleration", "Autotuner", "uninstall"]
