"""The contestants: openmae, openmae with mask tokens in the encoder, and HuggingFace ViTMAE.

Every engine starts from the same weights (the openmae model built with the run's seed, copied
into HF's layout by `openmae.interop.export_hf`), trains on the same images with the same masks
(the same `noise` tensor each step) and uses the same optimizer, so the only differences are the
model code and the precision path.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from openmae.engine.precision import Precision, autocast, gemm_context, needs_gemm_in_fp32
from openmae.extras import require
from openmae.models import MAEConfig, MaskedAutoencoder


@dataclass(frozen=True)
class EngineSpec:
    """One way of running a pretraining step.

    Attributes:
        name: row label in the results.
        library: "openmae" or "hf" (transformers' ViTMAEForPreTraining).
        attn: HF attention implementation ("eager" or "sdpa"); openmae picks its own.
        mask_tokens: openmae's `encoder_mask_tokens` baseline (the paper's slow design).
        gemm_in_fp32: bf16 GEMMs as fp32 GEMMs on CPUs without bf16 units (`Bf16GemmInFp32`).
        compile: wrap the model in `torch.compile`.
        about: one line for the results.
    """

    name: str
    library: Literal["openmae", "hf"]
    attn: str = "sdpa"
    mask_tokens: bool = False
    gemm_in_fp32: bool = False
    compile: bool = False
    about: str = ""


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("openmae", "openmae", gemm_in_fp32=True, about="openmae, fastest path"),
        EngineSpec(
            "mask_tokens",
            "openmae",
            mask_tokens=True,
            gemm_in_fp32=True,
            about="openmae, mask tokens in encoder",
        ),
        EngineSpec("hf_eager", "hf", attn="eager", about="HF ViTMAE, eager attention, torch.autocast"),
        EngineSpec("hf_sdpa", "hf", attn="sdpa", about="HF ViTMAE, SDPA attention, torch.autocast"),
        EngineSpec(
            "hf_eager_gemm32",
            "hf",
            attn="eager",
            gemm_in_fp32=True,
            about="HF eager + our bf16 GEMMs in fp32",
        ),
        EngineSpec(
            "hf_sdpa_gemm32", "hf", attn="sdpa", gemm_in_fp32=True, about="HF SDPA + our bf16 GEMMs in fp32"
        ),
        EngineSpec("openmae_autocast", "openmae", about="openmae, plain torch.autocast (bf16 GEMMs in bf16)"),
        EngineSpec("openmae_compile", "openmae", compile=True, about="openmae + torch.compile (inductor)"),
    )
}
HF_STOCK = ("hf_eager", "hf_sdpa")  # what an HF user gets: the bar for the targets
DEFAULT_PEERS = ("mask_tokens", "hf_eager", "hf_sdpa", "hf_eager_gemm32", "hf_sdpa_gemm32")


def engines_for(names: list[str], precision: Precision, device: torch.device | str) -> list[EngineSpec]:
    """The engines worth running here, in order, without duplicates.

    Where bf16 GEMMs need no help (fp32, a CPU with bf16 units, a GPU) the `*_gemm32` variants
    and `openmae_autocast` equal their plain twins and are dropped. Where they do, so is
    `openmae_compile`: inductor would call the slow bf16 kernels.
    """
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {sorted(ENGINES)}")
    if needs_gemm_in_fp32(device, precision):
        dropped = {"openmae_compile"}
    else:
        dropped = {"hf_eager_gemm32", "hf_sdpa_gemm32", "openmae_autocast"}
    return [ENGINES[n] for n in dict.fromkeys(names) if n not in dropped]


def build_model(spec: EngineSpec, config: MAEConfig, seed: int) -> nn.Module:
    """The engine's model with the run's shared weights (seeded openmae init, converted for HF)."""
    torch.manual_seed(seed)
    reference = MaskedAutoencoder(replace(config, encoder_mask_tokens=False))
    if spec.library == "hf":
        from openmae.interop import export_hf

        ViTMAEForPreTraining = require("transformers").ViTMAEForPreTraining

        hf_config, state = export_hf(reference)
        model = ViTMAEForPreTraining(hf_config)
        model.set_attn_implementation(spec.attn)
        model.load_state_dict(state, strict=True)
        return model
    if not spec.mask_tokens:
        return reference
    # The baseline shares every weight but the mask tokens (an encoder one replaces the decoder's).
    model = MaskedAutoencoder(replace(config, encoder_mask_tokens=True))
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    if missing != ["encoder_mask_token"] or unexpected != ["mask_token"]:
        raise RuntimeError(f"mask-token baseline: unexpected key mismatch {missing}, {unexpected}")
    return model


def build_optimizer(model: nn.Module, lr: float, fused: bool) -> torch.optim.Optimizer:
    """The paper's AdamW (betas 0.9/0.95, weight decay 0.05), fused into one kernel per step or
    as multi-tensor (foreach) updates. Frozen position embeddings are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05, **kind)


class TrainStep:
    """One engine's full training step on a fixed batch: forward, backward, optimizer step.

    Call it to run a step; it returns the (detached) loss without synchronising the device.
    """

    def __init__(
        self,
        spec: EngineSpec,
        config: MAEConfig,
        batch_size: int,
        device: torch.device | str,
        precision: Precision,
        seed: int = 0,
        fused_optimizer: bool = True,
    ) -> None:
        self.spec, self.device, self.precision, self.seed = spec, torch.device(device), precision, seed
        self.model = build_model(spec, config, seed).to(self.device).train()
        self.forward_model = torch.compile(self.model) if spec.compile else self.model
        self.optimizer = build_optimizer(self.model, lr=1.5e-4 * batch_size / 256, fused=fused_optimizer)
        generator = torch.Generator().manual_seed(seed)
        C, (H, W) = config.in_chans, config.img_size
        self.images = torch.randn(batch_size, C, H, W, generator=generator).to(self.device)  # [B, C, H, W]
        self.num_patches = (H // config.patch_size) * (W // config.patch_size)
        self.steps_done = 0

    def noise(self, step: int) -> torch.Tensor:
        """`[B, L]` masking noise of a step, the same for every engine of a run."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.rand(self.images.shape[0], self.num_patches, generator=generator).to(self.device)

    def loss(self, noise: torch.Tensor) -> torch.Tensor:
        if self.spec.library == "hf":
            return self.forward_model(pixel_values=self.images, noise=noise).loss
        return self.forward_model(self.images, noise=noise).loss

    def __call__(self) -> torch.Tensor:
        noise = self.noise(self.steps_done)
        with gemm_context(self.device, self.precision, self.spec.gemm_in_fp32):
            with autocast(self.device, self.precision):
                loss = self.loss(noise)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss.detach()


def step_flops(config: MAEConfig, mask_tokens: bool = False) -> int:
    """Matrix-multiply FLOPs of one training step's forward and backward pass, per image.

    Counted by torch's FlopCounterMode on the openmae model (HF's does the same products), with
    attention decomposed into matmuls so that it is counted too. The optimizer is not counted.
    """
    model = MaskedAutoencoder(replace(config, encoder_mask_tokens=mask_tokens))
    images = torch.randn(1, config.in_chans, *config.img_size)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(images).loss.backward()
    return counter.get_total_flops()


def optimizer_step_seconds(config: MAEConfig, fused: bool, steps: int = 3) -> float:
    """Median seconds of one AdamW step over the parameters of `config`'s model (random gradients)."""
    model = MaskedAutoencoder(config)
    optimizer = build_optimizer(model, lr=1e-4, fused=fused)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the moment buffers
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
