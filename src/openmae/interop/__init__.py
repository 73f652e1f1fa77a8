"""Checkpoint interop: openmae's safetensors format, the MAE reference, timm and HuggingFace ViTMAE.

- `save_checkpoint` / `load_checkpoint` / `read_metadata`: openmae's own files; `load_checkpoint`
  also reads reference `.pth`, timm and HF weights, building the model from their shapes if needed.
- `export_timm` / `to_timm`: the encoder for timm's `VisionTransformer`.
- `export_hf` / `to_hf`: the whole MAE for HF's `ViTMAEForPreTraining` (needs transformers).
"""

from openmae.interop.checkpoint import (
    load_checkpoint,
    load_state_into,
    read_checkpoint,
    read_metadata,
    save_checkpoint,
)
from openmae.interop.hf import export_hf, to_hf
from openmae.interop.infer import infer_config
from openmae.interop.timm import export_timm, to_timm

__all__ = [
    "export_hf",
    "export_timm",
    "infer_config",
    "load_checkpoint",
    "load_state_into",
    "read_checkpoint",
    "read_metadata",
    "save_checkpoint",
    "to_hf",
    "to_timm",
]
