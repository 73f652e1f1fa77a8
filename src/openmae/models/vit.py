"""The ViT encoder: patch embedding, fixed sin-cos positions, cls token, pre-norm blocks.

Parameter names are exactly those of timm's `VisionTransformer` (and of the MAE reference), so a
state dict moves between them unchanged. The masked autoencoder extends this class; a classifier
for linear probing or fine-tuning is this class with a head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from timm.layers import PatchEmbed, to_2tuple
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from openmae.models.layers import Block, LayerNorm, init_weights
from openmae.models.patches import patch_grid, take_patches
from openmae.models.pos_embed import sincos_2d

GlobalPool = Literal["token", "avg"]


@dataclass
class ViTConfig:
    """Shape of a ViT encoder (and, with `num_classes > 0`, of its classification head)."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 0
    global_pool: GlobalPool = "token"
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        self.img_size = tuple(to_2tuple(self.img_size))
        patch_grid(*self.img_size, self.patch_size)  # both sides divide, or a clear error
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 (2-D sin-cos), got {self.embed_dim}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        return d

    def encoder_config(self, **changes) -> ViTConfig:
        """This config's encoder part (a `ViTConfig`), e.g. for a classifier on a pretrained encoder."""
        fields = {k: v for k, v in self.to_dict().items() if k in ViTConfig.__dataclass_fields__}
        return ViTConfig(**{**fields, **changes})


class VisionTransformer(nn.Module):
    """ViT encoder with a cls token, fixed 2-D sin-cos position embedding and an optional head.

    `global_pool="token"` reads the normed cls token (the MAE linear-probe feature);
    `"avg"` averages the patch tokens and applies `fc_norm` (the MAE fine-tuning feature),
    exactly as timm lays out these two cases.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D = config.embed_dim
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, config.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, D), requires_grad=False)
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, drop_path=rate) for rate in rates
        )
        use_avg = config.global_pool == "avg"
        self.norm = nn.Identity() if use_avg else LayerNorm(D)
        self.fc_norm = LayerNorm(D) if use_avg else nn.Identity()
        self.head = nn.Linear(D, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_encoder()

    def _init_encoder(self) -> None:
        self.pos_embed.data.copy_(sincos_2d(self.config.embed_dim, self.grid_size)[None])
        # The patch projection is initialised like a linear layer over flattened patches.
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name == "head":
                continue
            init_weights(module)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.01)
            nn.init.zeros_(self.head.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        """`(h, w)` patches, read off the patch embedding."""
        return tuple(self.patch_embed.grid_size)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, L, D]` patch tokens with their position embedding."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def embed_patches_at(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]`, `[B, K]` grid positions -> `[B, K, D]`: the tokens `embed_patches` gives
        at those positions, computed for those patches only. The embedding is a linear map of each
        patch's pixels (timm's stride-P convolution, read here as a matrix), so the masked
        autoencoder embeds the visible quarter of the patches alone."""
        H, W = imgs.shape[-2:]
        if (H, W) != tuple(self.patch_embed.img_size):
            expected = "x".join(map(str, self.patch_embed.img_size))
            raise ValueError(f"images are {H}x{W}; this model takes {expected}")
        proj = self.patch_embed.proj
        pixels = take_patches(imgs, self.patch_size, ids)  # [B, K, C*P*P]
        tokens = F.linear(pixels, proj.weight.flatten(1), proj.bias)  # [B, K, D]
        return tokens + self.pos_embed[0, 1:][ids]  # [B, K, D]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, N, D]` -> `[B, 1+N, D]`: the cls token (plus its zero position) in front."""
        cls = self.cls_token + self.pos_embed[:, :1, :]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's transformer blocks, then its final norm. `[B, N, D]` -> `[B, N, D]`."""
        for block in self.blocks:
            x = self.run_block(block, x)
        return self.norm(x)

    def run_block(self, block: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One block (its output at `rows` only, if given: see `Block`); recomputed in the
        backward pass when gradient checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rows, use_reentrant=False)
        return block(x, rows)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encode a whole, unmasked image: `[B, C, H, W]` -> `[B, 1+L, D]` (cls first)."""
        return self.run_blocks(self.prepend_cls(self.embed_patches(imgs)))

    def pool(self, tokens: torch.Tensor, how: GlobalPool | None = None) -> torch.Tensor:
        """`[B, 1+L, D]` -> `[B, D]`: the cls token, or the mean patch token (through `fc_norm` when
        that is the model's own pooling). `how` defaults to the model's `global_pool`; another
        choice reads the tokens as they leave the encoder (e.g. average-pooled MAE features)."""
        how = how or self.config.global_pool
        if how not in ("token", "avg"):
            raise ValueError(f"pooling must be 'token' or 'avg', got {how!r}")
        if how == "token":
            return tokens[:, 0]
        mean = tokens[:, 1:].mean(dim=1)  # [B, D]
        return self.fc_norm(mean) if self.config.global_pool == "avg" else mean

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """`[B, 1+L, D]` -> `[B, num_classes]` (or the pooled `[B, D]` with `pre_logits`)."""
        pooled = self.pool(tokens)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(imgs))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens excluded from weight decay (read by timm's optimizer factory)."""
        names = {"cls_token", "pos_embed", "mask_token", "encoder_mask_token", "decoder_pos_embed"}
        return {name for name, _ in self.named_parameters() if name in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for layer-wise lr decay, in timm's format: embeddings, blocks, final norm."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed|^encoder_mask_token",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable
