"""Optional features and the extra that installs each: `pip install 'openmae[NAME]'`.

A feature that needs a package outside the core dependencies imports it through `require`, at the
moment it is used, so that openmae imports without it and a user who lacks it gets one line naming
the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from openmae.errors import UsageError

# module -> (distribution, extra, what needs it)
EXTRAS: dict[str, tuple[str, str, str]] = {
    "tifffile": ("tifffile", "tiff", "reading multi-band TIFF images"),
    "transformers": ("transformers", "hf", "HuggingFace ViTMAE interop"),
    "skimage": ("scikit-image", "photos", "the sample photographs"),
    "sklearn": ("scikit-learn", "photos", "the sample photographs and pixel baselines"),
    "webdataset": ("webdataset", "shards", "webdataset tar shards (data.dataset=webdataset, mae shards)"),
    "datasets": ("datasets", "hf-datasets", "HuggingFace datasets (data.dataset=hf)"),
    "pyarrow": ("pyarrow", "hf-datasets", "streaming HuggingFace parquet files (data.streaming=true)"),
    "simplejpeg": ("simplejpeg", "turbo", "libjpeg-turbo decoding (data.decoder=turbo)"),
}


class MissingExtraError(UsageError, ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def missing_extra_message(module: str) -> str:
    distribution, extra, feature = EXTRAS[module]
    return f"{feature} needs {distribution}, which is not installed: pip install 'openmae[{extra}]'"


def require(module: str) -> ModuleType:
    """Import an optional module (a key of `EXTRAS`), or raise `MissingExtraError` naming its extra."""
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is not an optional dependency of openmae")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(missing_extra_message(module)) from error


def available(module: str) -> bool:
    """Whether an optional module imports (without raising)."""
    try:
        require(module)
    except MissingExtraError:
        return False
    return True
