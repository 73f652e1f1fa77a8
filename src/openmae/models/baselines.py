"""The paper's slow baseline (Table 1c): mask tokens in the encoder.

MAE's encoder sees only the visible quarter of the patches, and that is where its 3x+ speed-up
comes from. The baseline it is measured against feeds the encoder every patch, the hidden ones
replaced by a learned mask token; the decoder then needs no un-shuffling. Everything else (weights,
masking, decoder, loss) is the MAE's, so the two share a state dict but for their mask token.
"""

from __future__ import annotations

import torch
from torch import nn

from openmae.models.mae import MaskedAutoencoder
from openmae.models.masking import Masking


class MaskTokensInEncoder(MaskedAutoencoder):
    """MAE whose encoder gets all L patches, a learned `encoder_mask_token` in place of each hidden one.

    Build it with `build_mae(MAEConfig(..., encoder_mask_tokens=True))`.
    """

    mask_tokens_in_encoder = True

    def add_mask_token(self) -> None:
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, self.config.embed_dim))

    def forward_encoder(self, imgs: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encode every patch, hidden ones as the mask token: `[B, C, H, W]` -> `[B, 1+L, D]`."""
        x = self.embed_patches(imgs)  # [B, L, D]
        hidden = masking.mask.unsqueeze(-1).bool()  # [B, L, 1]
        x = torch.where(hidden, self.encoder_mask_token + self.pos_embed[:, 1:, :], x)
        return self.run_blocks(self.prepend_cls(x))

    def forward_decoder(
        self, latent: torch.Tensor, masking: Masking, patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, 1+L, D]`, already in grid order -> `[B, L, P*P*C]` (or `[B, M, P*P*C]` at `patches`)."""
        return self.predict_pixels(self.decoder_embed(latent), patches)
