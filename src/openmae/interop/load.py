"""Loading weights of every format openmae reads into openmae models.

`load_checkpoint` reads openmae's own files (`openmae.checkpoint.format`), the MAE reference's `.pth`
files, timm ViT state dicts and HF ViTMAE weights (a state dict, a file, or a folder with
config.json). Without a model it builds one: from
the stored config when there is one, else from the tensor shapes (see `openmae.interop.infer`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from timm.layers import to_2tuple
from torch import nn

from openmae.checkpoint.format import FORMAT, is_openmae_file, read_metadata, read_weights, unwrap_model
from openmae.interop.hf import from_hf_state_dict, is_hf_state_dict, read_hf_dir
from openmae.interop.infer import infer_config, infer_grid
from openmae.interop.reference import load_pickle, unwrap_container
from openmae.interop.state import check_tensors, strip_wrapper_prefixes
from openmae.models.mae import MAEConfig, build_mae
from openmae.models.parts import DECODER, ENCODER, FINAL_NORM, HEAD, part_of
from openmae.models.pos_embed import resize_pos_embed
from openmae.models.probe import fold_probe_head
from openmae.models.registry import create_model
from openmae.models.vit import VisionTransformer, ViTConfig

logger = logging.getLogger(__name__)

Kind = Literal["mae", "encoder", "classifier"]


class NoClassifierHeadError(ValueError):
    """A classifier was asked for, and the checkpoint has no head (an MAE or encoder checkpoint)."""


# ------------------------------------------------------------------------------------------------
# Reading any format into openmae's names.


@dataclass
class Checkpoint:
    """Weights in openmae's names, and what the file says about the model (if anything)."""

    state: dict[str, torch.Tensor]
    format: str
    config: ViTConfig | None = None
    model_class: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def read_checkpoint(source: str | Path | Mapping) -> Checkpoint:
    """Read a file, folder or state dict of any supported format; rename its weights to openmae's."""
    if isinstance(source, Mapping):
        return _from_state_dict(source, "state dict")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        state, config = read_hf_dir(path)
        return Checkpoint(state, "huggingface", config, "MaskedAutoencoder")
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        if is_openmae_file(metadata):
            weights = read_weights(path, metadata)
            return Checkpoint(weights.state, FORMAT, weights.config, weights.model_class, weights.metadata)
        return _from_state_dict(load_file(path), str(path))
    return _from_state_dict(load_pickle(path), str(path))


def _from_state_dict(obj: object, origin: str) -> Checkpoint:
    """Reference / timm / HF state dicts (possibly inside a training checkpoint) -> openmae names."""
    state = strip_wrapper_prefixes(check_tensors(unwrap_container(obj), origin))
    if is_hf_state_dict(state):
        return Checkpoint(from_hf_state_dict(state), "huggingface")
    if "patch_embed.proj.weight" in state:
        return Checkpoint(fold_probe_head(state), "reference/timm")
    raise ValueError(
        f"{origin}: unrecognised checkpoint format (first keys: {list(state)[:5]}); expected openmae, "
        "MAE reference, timm ViT or HuggingFace ViTMAE weights"
    )


# ------------------------------------------------------------------------------------------------
# Building the model and loading weights into it.


def load_encoder(
    checkpoint: str | None,
    model: str | None,
    num_heads: int | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> VisionTransformer:
    """The encoder of `checkpoint` (any format), or a random one of the named size `model`."""
    if checkpoint is None or checkpoint.lower() == "none":
        if model is None:
            raise ValueError("give checkpoint=PATH, or checkpoint=none with model=NAME for a random init")
        return create_model(model, **({"img_size": img_size} if img_size else {}))
    overrides = {"num_heads": num_heads} if num_heads else {}
    return load_checkpoint(checkpoint, kind="encoder", img_size=img_size, **overrides)


def load_checkpoint(
    source: str | Path | Mapping,
    model: nn.Module | None = None,
    *,
    kind: Kind | None = None,
    img_size: int | tuple[int, int] | None = None,
    strict: bool = True,
    **config_overrides,
) -> nn.Module:
    """Load weights of any supported format, building the model when none is given.

    Args:
        source: an openmae `.safetensors` file, a reference / timm `.pth` (read with
            `weights_only=True`), a HF folder (config.json + weights), or a state dict.
        model: load into this model instead of building one (its position tables keep their size:
            the checkpoint's are resized to them).
        kind: what to build: "mae" (MaskedAutoencoder), "encoder" (VisionTransformer without a
            head) or "classifier" (VisionTransformer with a head). Default: as saved for openmae
            files; else "classifier" if the checkpoint has a head, otherwise "mae" (an encoder-only
            checkpoint gets a freshly initialised decoder, with a warning).
        img_size: build the model for this image size; position tables are resized to it.
        strict: encoder weights must match exactly; parts the checkpoint lacks (decoder, head,
            final norm) are freshly initialised with a warning, parts the model lacks are dropped.
        **config_overrides: config fields to set, e.g. `num_heads=` (not stored in reference, timm
            or HF state dicts), `decoder_embed_dim=`, `norm_pix_loss=`, `num_classes=`.

    Returns:
        The model with the weights loaded.
    """
    checkpoint = read_checkpoint(source)
    if model is None:
        model, source_grid = build_model(checkpoint, kind, img_size, config_overrides)
    else:
        if kind is not None or img_size is not None or config_overrides:
            raise ValueError(
                "kind, img_size and config overrides apply only when load_checkpoint builds the model"
            )
        source_grid = checkpoint.config.grid_size if checkpoint.config else None
    load_state_into(model, checkpoint.state, source_grid=source_grid, strict=strict)
    return model


def build_model(
    checkpoint: Checkpoint,
    kind: Kind | None = None,
    img_size: int | tuple[int, int] | None = None,
    overrides: Mapping | None = None,
) -> tuple[VisionTransformer, tuple[int, int]]:
    """A freshly initialised model that fits a checkpoint, and the grid of its position tables."""
    overrides = dict(overrides or {})
    if checkpoint.config is not None:
        found = checkpoint.config.to_dict()
    else:
        found = infer_config(checkpoint.state, img_size=img_size, given=overrides)
    H, W = to_2tuple(found["img_size"])
    source_grid = (H // found["patch_size"], W // found["patch_size"])
    kind = kind or _default_kind(checkpoint, found)
    if kind == "mae":
        # A pretraining model reads the encoder through `norm`; a classifier head is of no use to it.
        wanted, config_cls = {**found, "num_classes": 0, "global_pool": "token"}, MAEConfig
    elif kind == "encoder":
        wanted, config_cls = {**found, "num_classes": 0}, ViTConfig
    elif kind == "classifier":
        wanted, config_cls = found, ViTConfig
    else:
        raise ValueError(f"kind must be 'mae', 'encoder' or 'classifier', got {kind!r}")
    unknown = sorted(set(overrides) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields {unknown} for kind={kind!r}")
    wanted = {**_fields_of(config_cls, wanted), **overrides}
    if img_size is not None:
        wanted["img_size"] = img_size
    if kind == "classifier" and wanted.get("num_classes", 0) <= 0:
        raise NoClassifierHeadError("the checkpoint has no classifier head: pass num_classes= to build one")
    config = config_cls(**wanted)
    model = build_mae(config) if config_cls is MAEConfig else VisionTransformer(config)
    return model, source_grid


def _fields_of(config_cls: type, values: Mapping) -> dict:
    names = {f.name for f in fields(config_cls)}
    return {k: v for k, v in values.items() if k in names}


def _default_kind(checkpoint: Checkpoint, found: dict) -> Kind:
    if checkpoint.model_class == "MaskedAutoencoder":
        return "mae"
    if checkpoint.model_class == "VisionTransformer":
        return "classifier" if found.get("num_classes", 0) > 0 else "encoder"
    return "classifier" if "head.weight" in checkpoint.state else "mae"


def load_state_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source_grid: tuple[int, int] | None = None,
    strict: bool = True,
) -> None:
    """Load openmae-named weights into `model`, part by part (see `openmae.interop.state`).

    Position tables (`pos_embed`, `decoder_pos_embed`) are resized from `source_grid` (default:
    the model's grid when the lengths agree, else a square) to the model's grid.

    Raises:
        ValueError: on a shape mismatch, or (with `strict`) on missing or unexpected encoder weights.
    """
    model = unwrap_model(model)
    state = _resize_positions(dict(state), model, source_grid)
    expected = model.state_dict()
    wrong = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"checkpoint does not fit the model, shape mismatch in {len(wrong)} tensors: "
            + "; ".join(wrong[:6])
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    _check_encoder(missing, unexpected, strict)
    for part, keys in _by_part(k for k in missing if part_of(k) != ENCODER).items():
        warnings.warn(
            f"the checkpoint has no {part} weights: the model's {part} ({_summary(keys)}) "
            "is freshly initialised",
            stacklevel=3,
        )
    for part, keys in _by_part(k for k in unexpected if part_of(k) != ENCODER).items():
        logger.info("dropped the checkpoint's %s weights (%s): the model has none", part, _summary(keys))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _check_encoder(missing: list[str], unexpected: list[str], strict: bool) -> None:
    missing = [k for k in missing if part_of(k) == ENCODER]
    unexpected = [k for k in unexpected if part_of(k) == ENCODER]
    if not (missing or unexpected):
        return
    problem = f"encoder weights do not match: missing {missing[:8]}, unexpected {unexpected[:8]}"
    if strict:
        raise ValueError(problem + " (pass strict=False to load what matches)")
    warnings.warn(problem, stacklevel=4)


def _by_part(keys) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(part_of(key), []).append(key)
    return {part: groups[part] for part in (DECODER, HEAD, FINAL_NORM) if part in groups}


def _summary(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _resize_positions(
    state: dict[str, torch.Tensor], model: nn.Module, source_grid: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """Resize `pos_embed` / `decoder_pos_embed` from the checkpoint's grid to the model's."""
    target_grid = tuple(model.grid_size)
    for key in ("pos_embed", "decoder_pos_embed"):
        if key not in state or not hasattr(model, key):
            continue
        num_patches = state[key].shape[1] - 1  # one prefix token (cls)
        grid = tuple(source_grid) if source_grid is not None else infer_grid(num_patches, target_grid)
        if grid[0] * grid[1] != num_patches:
            raise ValueError(f"checkpoint {key} has {num_patches} patches, not a {grid[0]}x{grid[1]} grid")
        if grid != target_grid:
            logger.info("resizing %s from a %s grid to %s", key, grid, target_grid)
            state[key] = resize_pos_embed(state[key], grid, target_grid)
    return state
