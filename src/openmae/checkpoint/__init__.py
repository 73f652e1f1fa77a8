"""openmae's own files: model weights (`format`) and resumable run checkpoints (`run`).

Both the training loop and the interop readers use these; the readers of other libraries' formats
are in `openmae.interop`.
"""

from openmae.checkpoint.format import (
    Weights,
    read_metadata,
    read_weights,
    save_checkpoint,
    unwrap_model,
)
from openmae.checkpoint.run import (
    check_run_checkpoint,
    full_model_state,
    full_optimizer_state,
    list_checkpoints,
    load_optimizer_state,
    load_run_checkpoint,
    resolve_resume,
    save_run_checkpoint,
)

__all__ = [
    "Weights",
    "check_run_checkpoint",
    "full_model_state",
    "full_optimizer_state",
    "list_checkpoints",
    "load_optimizer_state",
    "load_run_checkpoint",
    "read_metadata",
    "read_weights",
    "resolve_resume",
    "save_checkpoint",
    "save_run_checkpoint",
    "unwrap_model",
]
