"""Model code: layers, position embeddings, masking, the ViT encoder, the MAE and named sizes."""

from openmae.models.baselines import MaskTokensInEncoder
from openmae.models.mae import MAEConfig, MAEOutput, MaskedAutoencoder, build_mae
from openmae.models.masking import Masking, random_masking, sample_masking
from openmae.models.patches import patchify, unpatchify
from openmae.models.pos_embed import resize_pos_embed, sincos_2d
from openmae.models.registry import create_model, list_models, model_config
from openmae.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "MAEConfig",
    "MAEOutput",
    "Masking",
    "MaskTokensInEncoder",
    "MaskedAutoencoder",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "build_mae",
    "list_models",
    "model_config",
    "patchify",
    "random_masking",
    "resize_pos_embed",
    "sample_masking",
    "sincos_2d",
    "unpatchify",
]
