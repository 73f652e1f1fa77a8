"""openmae: masked autoencoders for self-supervised pretraining of vision transformers."""

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
    "list_models",
]
