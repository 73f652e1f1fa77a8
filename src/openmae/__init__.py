"""openmae: masked autoencoders for self-supervised pretraining of vision transformers."""

from openmae.checkpoint import read_metadata, save_checkpoint
from openmae.config import load_config
from openmae.interop import export_hf, export_timm, load_checkpoint, to_hf, to_timm
from openmae.models import (
    MAEConfig,
    MAEOutput,
    MaskedAutoencoder,
    VisionTransformer,
    ViTConfig,
    create_model,
    list_models,
)
from openmae.recipes.pretrain import PretrainConfig, pretrain

__version__ = "0.1.0"

__all__ = [
    "MAEConfig",
    "MAEOutput",
    "MaskedAutoencoder",
    "PretrainConfig",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "create_model",
    "export_hf",
    "export_timm",
    "list_models",
    "load_config",
    "load_checkpoint",
    "pretrain",
    "read_metadata",
    "save_checkpoint",
    "to_hf",
    "to_timm",
]
