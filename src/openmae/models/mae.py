"""The masked autoencoder (He et al., 2022): an asymmetric ViT encoder-decoder.

The encoder (inherited from :class:`VisionTransformer`) sees only the visible patches; a light
decoder gets the encoded visible tokens plus one shared mask token per hidden patch, puts them
back in grid order, adds its own fixed positions and predicts the pixels of every patch. The loss
is the mean squared error over the hidden patches only.

Parameter names: the encoder's are timm's; every decoder name starts with `decoder_`, plus the
reference's `mask_token`. A state dict of this model therefore loads into the reference code,
and its encoder part into timm, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from openmae.models.layers import Block, LayerNorm, init_weights, take_tokens
from openmae.models.masking import (
    MASK_SAMPLINGS,
    Masking,
    masking_from_mask,
    num_kept,
    random_masking,
    sample_masking,
)
from openmae.models.patches import normalize_patches, patchify
from openmae.models.pos_embed import sincos_2d
from openmae.models.vit import VisionTransformer, ViTConfig


@dataclass
class MAEConfig(ViTConfig):
    """Encoder shape (from :class:`ViTConfig`) plus the decoder and the pretext task."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True  # the paper's recipe (Table 1d); the reference code's flag defaults to off
    mask_ratio: float = 0.75
    mask_sampling: str = "random"
    encoder_mask_tokens: bool = False  # the paper's slow baseline (Table 1c): see `build_mae`

    def __post_init__(self) -> None:
        super().__post_init__()
        num_kept(self.grid_size[0] * self.grid_size[1], self.mask_ratio)  # some patch stays visible
        if self.mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"mask_sampling must be one of {MASK_SAMPLINGS}, got {self.mask_sampling!r}")
        if self.decoder_depth < 1:
            raise ValueError(f"decoder_depth must be at least 1, got {self.decoder_depth}")
        if self.decoder_embed_dim % 4 or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by 4 and by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )


@dataclass
class MAEOutput:
    """What a pretraining forward pass gives.

    Attributes:
        loss: scalar, mean squared error over the hidden patches.
        pred: `[B, L, P*P*C]` predicted target (pixels or normalised pixels) for every patch, or
            with `predict="hidden"` `[B, L-K, P*P*C]` for the hidden patches, in the order of
            `ids_hidden`.
        mask: `[B, L]`, 1 = hidden (predicted), 0 = visible.
        ids_restore: `[B, L]` indices that undo the masking shuffle.
        ids_hidden: `[B, L-K]` grid positions of the hidden patches.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    ids_hidden: torch.Tensor


class MaskedAutoencoder(VisionTransformer):
    """MAE with a ViT encoder and a light transformer decoder."""

    mask_tokens_in_encoder = False  # see `models.baselines.MaskTokensInEncoder`

    def __init__(self, config: MAEConfig) -> None:
        if config.encoder_mask_tokens != self.mask_tokens_in_encoder:
            raise ValueError(
                "encoder_mask_tokens selects another model class: build it with build_mae(config)"
            )
        super().__init__(config)
        self.config: MAEConfig = config
        D, Dd = config.embed_dim, config.decoder_embed_dim
        L = self.num_patches
        self.decoder_embed = nn.Linear(D, Dd)
        self.add_mask_token()
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + L, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, config.decoder_num_heads, config.mlp_ratio) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, config.patch_size**2 * config.in_chans)
        self._init_decoder()

    def add_mask_token(self) -> None:
        """The one learned token that stands for every hidden patch in the decoder's input."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.config.decoder_embed_dim))

    def _init_decoder(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.config.decoder_embed_dim, self.grid_size)[None])
        for name, param in self.named_parameters():
            if name.endswith("mask_token"):
                nn.init.normal_(param, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("decoder_"):
                init_weights(module)

    # ----------------------------------------------------------------------------------------
    # The steps of the method, one method each.

    def reconstruction_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, L, P*P*C]` pixels, normalised per patch with `norm_pix_loss`."""
        target = patchify(imgs, self.patch_size)
        return normalize_patches(target) if self.config.norm_pix_loss else target

    def choose_masking(
        self,
        batch_size: int,
        device: torch.device,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Masking:
        """A given `mask` wins, then a given `noise` (random masking), then the configured sampler."""
        if mask is not None:
            return masking_from_mask(mask.to(device))
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        if noise is not None:
            if noise.shape != (batch_size, self.num_patches):
                raise ValueError(
                    f"noise must be [B, L] = [{batch_size}, {self.num_patches}], got {list(noise.shape)}"
                )
            return random_masking(noise.to(device), ratio)
        return sample_masking(batch_size, self.grid_size, ratio, self.config.mask_sampling, device, generator)

    def forward_encoder(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encode the visible patches only: `[B, C, H, W]` -> `[B, 1+K, D]` (cls first)."""
        x = self.embed_patches_at(imgs, masking.ids_keep)  # [B, K, D]: the hidden ones are never embedded
        return self.run_blocks(self.prepend_cls(x))

    def forward_decoder(
        self, latent: torch.Tensor, masking: Masking, patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict every patch: `[B, 1+K, D]` -> `[B, L, P*P*C]`, or with `patches` only those."""
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        x = torch.cat([x[:, :1], self.unshuffle_with_mask_tokens(x[:, 1:], masking)], dim=1)
        return self.predict_pixels(x, patches)

    def predict_pixels(self, x: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's blocks over the full grid: `[B, 1+L, Dd]` (grid order) -> `[B, L, P*P*C]`.

        With `patches` (`[B, M]` grid positions) only those are predicted, `[B, M, P*P*C]`: the
        last block still attends over every token, but its projection and MLP, the norm and the
        head run on M rows, which is all the loss reads when `patches` are the hidden ones.
        """
        x = x + self.decoder_pos_embed  # [B, 1+L, Dd]
        *blocks, last = self.decoder_blocks
        for block in blocks:
            x = self.run_block(block, x)
        if patches is None:
            x = self.run_block(last, x)  # [B, 1+L, Dd]
            return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop the cls token
        x = self.run_block(last, x, patches + 1)  # [B, M, Dd]; token 0 is the cls token
        return self.decoder_pred(self.decoder_norm(x))  # [B, M, P*P*C]

    def unshuffle_with_mask_tokens(self, visible: torch.Tensor, masking: Masking) -> torch.Tensor:
        """`[B, K, Dd]` visible tokens -> `[B, L, Dd]` in grid order, a mask token in every hole."""
        B, K, Dd = visible.shape
        L = masking.ids_restore.shape[1]
        shuffled = torch.cat([visible, self.mask_token.expand(B, L - K, Dd)], dim=1)  # [B, L, Dd]
        return take_tokens(shuffled, masking.ids_restore)

    @staticmethod
    def forward_loss(
        pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error per patch, averaged over the hidden patches only.

        `pred`, `target`: `[B, L, P*P*C]`; `mask`: `[B, L]`, or None when every patch given is a
        hidden one. With nothing hidden the loss is 0.
        """
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
        if mask is None:
            return per_patch.sum() / max(per_patch.numel(), 1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        predict: Literal["all", "hidden"] = "all",
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch `[B, C, H, W]`.

        Args:
            mask_ratio: overrides the configured ratio for this call.
            noise: `[B, L]` uniform noise for random masking (makes masking reproducible).
            mask: `[B, L]` explicit mask, 1 = hidden; every row must hide the same count.
            generator: random source for the configured sampler.
            predict: "all" patches, or only the "hidden" ones the loss reads (training: the tail
                of the decoder then runs on those rows alone); the loss is the same.
        """
        if predict not in ("all", "hidden"):
            raise ValueError(f"predict must be 'all' or 'hidden', got {predict!r}")
        masking = self.choose_masking(imgs.shape[0], imgs.device, mask_ratio, noise, mask, generator)
        latent = self.forward_encoder(imgs, masking)
        target = self.reconstruction_target(imgs)  # [B, L, P*P*C]
        if predict == "all":
            pred = self.forward_decoder(latent, masking)  # [B, L, P*P*C]
            loss = self.forward_loss(pred, target, masking.mask)
        else:
            pred = self.forward_decoder(latent, masking, masking.ids_hidden)  # [B, L-K, P*P*C]
            loss = self.forward_loss(pred, take_tokens(target, masking.ids_hidden))
        return MAEOutput(
            loss=loss,
            pred=pred,
            mask=masking.mask,
            ids_restore=masking.ids_restore,
            ids_hidden=masking.ids_hidden,
        )


def build_mae(config: MAEConfig) -> MaskedAutoencoder:
    """The model a config describes: the MAE, or with `encoder_mask_tokens` the paper's baseline."""
    if config.encoder_mask_tokens:
        from openmae.models.baselines import MaskTokensInEncoder

        return MaskTokensInEncoder(config)
    return MaskedAutoencoder(config)
