"""openmae: masked autoencoders for self-supervised pretraining of vision transformers."""

from openmae.interop import export_hf, export_timm, load_checkpoint, save_checkpoint
from openmae.models import (
    MAEConfig,
    MAEOutput,
    MaskedAutoencoder,
    ViTConfig,
    VisionTransformer,
    create_model,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "MAEConfig",
    "MAEOutput",
    "MaskedAutoencoder",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "create_model",
    "export_hf",
    "export_timm",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
