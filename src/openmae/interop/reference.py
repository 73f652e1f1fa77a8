"""Pickled checkpoints: the MAE reference's `.pth` files, timm's and plain `torch.save` state dicts.

The reference code saves `{'model': state_dict, ...}` (training checkpoints add the optimizer, the
epoch and the argparse `args`) under the very names openmae uses, so no renaming is needed. Its
linear-probe checkpoints put a BatchNorm without affine parameters in front of the classifier
(`head.0`, `head.1`); `load_checkpoint` folds it into a single linear `head`
(`openmae.models.probe.fold_probe_head`). Pickles are only ever read
with `torch.load(weights_only=True)`, which refuses anything that could run code.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Where training scripts nest the weights: the reference (`model`), timm (`state_dict`), others.
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")


def load_pickle(path: str | Path) -> Any:
    """`torch.load` a `.pth` / `.bin` file on the CPU without running any code from it.

    Besides tensors and plain containers, only `argparse.Namespace` (the reference and timm store
    their command-line arguments in checkpoints) is allowed; it holds data only.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        if found is None:  # not a pickle at all (e.g. random bytes)
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
        detail = found.group(1).split(". ")[0].strip()
        raise ValueError(
            f"refused to load {path}: torch.load(weights_only=True) cannot read it safely ({detail}). "
            "Only tensors and plain containers are loaded, since unpickling other objects can run code; "
            "save the weights as a plain state dict or as safetensors"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # empty or truncated files: EOFError, OSError, RuntimeError, KeyError...
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (empty, truncated or another format; {detail})"
        ) from e


def unwrap_container(obj: Any) -> Any:
    """The state dict inside a training checkpoint (`{'model': ...}`, `{'state_dict': ...}`), or `obj`."""
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj
