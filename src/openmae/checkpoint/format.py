"""openmae's own weights file: one safetensors file with the model's config in its metadata.

The metadata (strings only) holds `format="openmae"`, `version="1"`, `model_class`
("MaskedAutoencoder" or "VisionTransformer") and `config` (the model config as JSON), plus whatever
strings the caller adds (e.g. `step`, `run_config`). Such a file rebuilds its model with no other
information (`read_weights`); `openmae.interop.load_checkpoint` reads it like every other format.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from openmae.errors import DivergedError
from openmae.models.mae import MAEConfig, MaskedAutoencoder, build_mae
from openmae.models.vit import VisionTransformer, ViTConfig

FORMAT = "openmae"
VERSION = "1"
RESERVED_METADATA = ("format", "version", "model_class", "config")
MODEL_CLASSES: dict[str, type[ViTConfig]] = {"MaskedAutoencoder": MAEConfig, "VisionTransformer": ViTConfig}


class NonFiniteWeightsError(DivergedError, ValueError):
    """Weights with NaN or inf, which `save_checkpoint` refuses to write."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    for name in ("_orig_mod", "module"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    return model


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    metadata: dict[str, str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a model's weights and config as an openmae safetensors file, atomically.

    Args:
        model: an openmae MaskedAutoencoder or VisionTransformer (DDP / compile wrappers are removed).
        path: destination file; its folder is created if needed.
        metadata: extra strings to store (e.g. `{"step": "100"}`); the keys `format`, `version`,
            `model_class` and `config` are openmae's own.
        state_dict: the weights to write instead of `model.state_dict()`, under the same names
            (e.g. the full weights gathered from an FSDP-sharded `model`).

    Raises:
        ValueError: on non-finite weights (nothing is written) or bad metadata.
    """
    model = unwrap_model(model)
    model_class = _model_class_name(model)
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for openmae's own use; choose other names")
    not_str = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if not_str:
        raise ValueError(f"metadata must map strings to strings; not so for {not_str}")
    weights = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise NonFiniteWeightsError(
            f"refusing to save non-finite weights (NaN or inf) in {nonfinite[:8]}: if training diverged, "
            "lower the learning rate, enable clip_grad, or use fp32"
        )
    header = {
        **extra,
        "format": FORMAT,
        "version": VERSION,
        "model_class": model_class,
        "config": json.dumps(model.config.to_dict()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a crash never leaves a half-written checkpoint.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(state, tmp, metadata=header)
        # safetensors creates its files with mode 0600: give the weights the mode any file gets.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (for openmae's: format, version, model_class, config...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a safetensors file: {e}") from e


def is_openmae_file(metadata: Mapping[str, str]) -> bool:
    return metadata.get("format") == FORMAT


@dataclass
class Weights:
    """What an openmae file holds: the weights, the model config and class, and the metadata."""

    state: dict[str, torch.Tensor]
    config: ViTConfig
    model_class: str
    metadata: dict[str, str] = field(default_factory=dict)

    def build_model(self) -> VisionTransformer:
        """A freshly initialised model of the stored class and config (weights not loaded)."""
        if isinstance(self.config, MAEConfig):
            return build_mae(self.config)
        return VisionTransformer(self.config)


def read_weights(path: str | Path, metadata: Mapping[str, str] | None = None) -> Weights:
    """Read an openmae file (its `metadata` when already read); ValueError for anything else."""
    path = Path(path)
    metadata = dict(metadata if metadata is not None else read_metadata(path))
    if not is_openmae_file(metadata):
        raise ValueError(f"{path} is not an openmae checkpoint (no format=openmae in its metadata)")
    if metadata.get("version") != VERSION:
        raise ValueError(
            f"{path}: openmae checkpoint version {metadata.get('version')!r}; this openmae reads {VERSION}"
        )
    model_class = metadata.get("model_class")
    if model_class not in MODEL_CLASSES:
        raise ValueError(
            f"{path}: unknown model_class {model_class!r}; expected one of {list(MODEL_CLASSES)}"
        )
    try:
        config = MODEL_CLASSES[model_class](**json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the stored model config cannot be read: {e}") from e
    return Weights(load_file(path), config, model_class, metadata)


def _model_class_name(model: nn.Module) -> str:
    if isinstance(model, MaskedAutoencoder):
        return "MaskedAutoencoder"
    if isinstance(model, VisionTransformer):
        return "VisionTransformer"
    raise TypeError(f"save_checkpoint needs an openmae model, got {type(model).__name__}")
