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

import torch
from torch import nn

from openmae.models.layers import Block, LayerNorm, init_weights
from openmae.models.masking import (
    MASK_SAMPLINGS,
    Masking,
    check_mask_ratio,
    masking_from_mask,
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
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75
    mask_sampling: str = "random"
    encoder_mask_tokens: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_mask_ratio(self.mask_ratio)
        if self.mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"mask_sampling must be one of {MASK_SAMPLINGS}, got {self.mask_sampling!r}")
        if self.decoder_embed_dim % 4 or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by 4 and by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )

    def encoder_config(self, **changes) -> ViTConfig:
        """The encoder's part of this config, e.g. to build a classifier from the pretrained encoder."""
        fields = {k: v for k, v in self.to_dict().items() if k in ViTConfig.__dataclass_fields__}
        return ViTConfig(**{**fields, **changes})


@dataclass
class MAEOutput:
    """What a pretraining forward pass gives.

    Attributes:
        loss: scalar, mean squared error over the hidden patches.
        pred: `[B, L, P*P*C]` predicted target (pixels or normalised pixels) for every patch.
        mask: `[B, L]`, 1 = hidden (predicted), 0 = visible.
        ids_restore: `[B, L]` indices that undo the masking shuffle.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor


class MaskedAutoencoder(VisionTransformer):
    """MAE with a ViT encoder and a light transformer decoder."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__(config)
        self.config: MAEConfig = config
        D, Dd = config.embed_dim, config.decoder_embed_dim
        L = self.num_patches
        if config.encoder_mask_tokens:
            # The paper's slow baseline: hidden patches enter the encoder as a learned token.
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_embed = nn.Linear(D, Dd)
        if not config.encoder_mask_tokens:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + L, Dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, config.decoder_num_heads, config.mlp_ratio) for _ in range(config.decoder_depth)
        )
        self.decoder_norm = LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, config.patch_size**2 * config.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.config.decoder_embed_dim, self.grid_size)[None])
        for token in ("mask_token", "encoder_mask_token"):
            if hasattr(self, token):
                nn.init.normal_(getattr(self, token), std=0.02)
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
        """Encode the visible patches: `[B, C, H, W]` -> `[B, 1+K, D]` (cls first).

        With `encoder_mask_tokens` the hidden patches are replaced by a mask token instead of
        being dropped, and the result is `[B, 1+L, D]`.
        """
        x = self.embed_patches(imgs)  # [B, L, D]
        if self.config.encoder_mask_tokens:
            hidden = masking.mask.unsqueeze(-1).bool()  # [B, L, 1]
            x = torch.where(hidden, self.encoder_mask_token + self.pos_embed[:, 1:, :], x)
        else:
            index = masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # [B, K, D]
            x = torch.gather(x, dim=1, index=index)  # [B, K, D]
        return self.run_blocks(self.prepend_cls(x))

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Predict every patch: `[B, 1+K, D]` -> `[B, L, P*P*C]`."""
        x = self.decoder_embed(latent)  # [B, 1+K, Dd]
        if not self.config.encoder_mask_tokens:
            x = torch.cat([x[:, :1], self.unshuffle_with_mask_tokens(x[:, 1:], masking)], dim=1)
        x = x + self.decoder_pos_embed  # [B, 1+L, Dd]
        for block in self.decoder_blocks:
            x = self.run_block(block, x)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, 1+L, P*P*C]
        return x[:, 1:]  # drop the cls token

    def unshuffle_with_mask_tokens(self, visible: torch.Tensor, masking: Masking) -> torch.Tensor:
        """`[B, K, Dd]` visible tokens -> `[B, L, Dd]` in grid order, a mask token in every hole."""
        B, K, Dd = visible.shape
        L = masking.ids_restore.shape[1]
        shuffled = torch.cat([visible, self.mask_token.expand(B, L - K, Dd)], dim=1)  # [B, L, Dd]
        index = masking.ids_restore.unsqueeze(-1).expand(-1, -1, Dd)  # [B, L, Dd]
        return torch.gather(shuffled, dim=1, index=index)

    @staticmethod
    def forward_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the hidden patches only.

        `pred`, `target`: `[B, L, P*P*C]`; `mask`: `[B, L]`. With nothing hidden the loss is 0.
        """
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode and score a batch `[B, C, H, W]`.

        Args:
            mask_ratio: overrides the configured ratio for this call.
            noise: `[B, L]` uniform noise for random masking (makes masking reproducible).
            mask: `[B, L]` explicit mask, 1 = hidden; every row must hide the same count.
            generator: random source for the configured sampler.
        """
        masking = self.choose_masking(imgs.shape[0], imgs.device, mask_ratio, noise, mask, generator)
        latent = self.forward_encoder(imgs, masking)
        pred = self.forward_decoder(latent, masking)
        loss = self.forward_loss(pred, self.reconstruction_target(imgs), masking.mask)
        return MAEOutput(loss=loss, pred=pred, mask=masking.mask, ids_restore=masking.ids_restore)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights alone, under timm's names (no decoder, no mask tokens)."""
        return {k: v for k, v in self.state_dict().items() if is_encoder_key(k)}


def is_encoder_key(key: str) -> bool:
    """True for encoder parameter names (timm's), false for the decoder and the mask tokens."""
    return not (key.startswith("decoder_") or key in ("mask_token", "encoder_mask_token"))
