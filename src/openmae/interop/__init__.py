"""Checkpoint interop: reading every format into openmae models, writing the MAE reference's, timm's
and HuggingFace ViTMAE's.

- `load_checkpoint`: openmae files, reference `.pth`, timm and HF weights, building the model from
  their stored config or their shapes if needed (openmae's own format is `openmae.checkpoint`).
- `export_timm` / `to_timm`: the encoder for timm's `VisionTransformer`.
- `export_hf` / `to_hf`: the whole MAE for HF's `ViTMAEForPreTraining` (needs transformers).
"""

from openmae.interop.hf import export_hf, to_hf
from openmae.interop.infer import infer_config
from openmae.interop.load import load_checkpoint, load_encoder, load_state_into, read_checkpoint
from openmae.interop.timm import export_timm, to_timm

__all__ = [
    "export_hf",
    "export_timm",
    "infer_config",
    "load_checkpoint",
    "load_encoder",
    "load_state_into",
    "read_checkpoint",
    "to_hf",
    "to_timm",
]
