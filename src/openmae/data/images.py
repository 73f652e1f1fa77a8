"""Reading one image file into a float tensor `[C, H, W]` in [0, 1], at a chosen channel count.

PIL decodes the common formats (an animated GIF gives its first frame); TIFFs go through `tifffile`
when it is installed (the `tiff` extra) because PIL cannot read TIFFs with more than 4 bands
(satellite, microscopy).
Integer pixels are scaled by their type's maximum (so 16-bit images use their full range);
float pixels are kept as stored.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from openmae import extras
from openmae.extras import MissingExtraError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # GIF: its first frame
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")

Channels = Literal["keep", "rgb", "gray"] | int

# ITU-R 601-2 luma, the weights PIL uses for convert("L").
_LUMA = torch.tensor([0.299, 0.587, 0.114])

# PIL modes that are not a plain stack of channels, and the mode to decode them into.
_PIL_CONVERT = {
    "1": "L",
    "P": "RGB",
    "PA": "RGBA",
    "LA": "LA",
    "La": "LA",
    "RGBa": "RGBA",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}


class UnreadableImageError(OSError):
    """A file that should be an image could not be decoded (truncated, empty, not an image...)."""


class UnusableChannelsError(UnreadableImageError, ValueError):
    """An image whose channels cannot give the ones asked for (an RGB photo for a 4-channel model):
    the datasets skip it and name it, as they do an unreadable file."""


def is_image_file(path: str | Path) -> bool:
    """True for a supported extension (case-insensitive) on a name that is not hidden."""
    name = Path(path).name
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def read_image(
    source: str | Path | bytes, channels: Channels = "keep", name: str | None = None
) -> torch.Tensor:
    """Decode an image file (or its bytes) to float32 `[C, H, W]` in [0, 1] with `channels` applied.

    `name` says where bytes come from, for messages (a path names itself).

    Raises:
        UnreadableImageError: the image cannot be decoded.
        UnusableChannelsError: its channels cannot be converted as `channels` asks (the file is named;
            the reason alone is the error's `__cause__`).
        ValueError: `channels` is not a channel mode.
    """
    check_channels(channels)
    image = decode_image(source, name)
    try:
        return convert_channels(image, channels)
    except ValueError as error:
        raise UnusableChannelsError(f"{_describe(source, name)}: {error}") from error


def decode_image(source: str | Path | bytes, name: str | None = None) -> torch.Tensor:
    """Decode an image file, or an encoded image's bytes (e.g. from a tar shard), to float32
    `[C, H, W]` with its stored channels, scaled to [0, 1]."""
    if not isinstance(source, bytes):
        source = Path(source)
    try:
        if _is_tiff(source):
            array = _read_tiff(source)  # [H, W, C]
        else:
            array = _read_pil(source)  # [H, W, C]
    except (MemoryError, MissingExtraError):
        raise
    except Exception as error:
        # Decoders raise many types on damaged files (OSError, ValueError, SyntaxError, EOFError...).
        raise UnreadableImageError(f"cannot read image {_describe(source, name)}: {error}") from error
    return _to_unit_tensor(array)  # [C, H, W]


def _describe(source: Path | str | bytes, name: str | None) -> str:
    return name or ("<image bytes>" if isinstance(source, bytes) else str(source))


def _is_tiff(source: Path | bytes) -> bool:
    """A TIFF by its name, or (bytes) by its first four bytes."""
    if isinstance(source, bytes):
        return source[:4] in _TIFF_MAGIC
    return source.suffix.lower() in (".tif", ".tiff")


def _open(source: Path | bytes):
    """What PIL and tifffile open: the path, or a fresh stream over the bytes."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def convert_channels(image: torch.Tensor, channels: Channels) -> torch.Tensor:
    """Convert `[C, H, W]` to the channels asked for.

    `"keep"` leaves the image alone; `"rgb"` repeats gray and drops alpha; `"gray"` takes the luma of
    colour images and the mean of other multi-band images; an int `n` demands `n` channels,
    converting only between gray (1) and RGB (3), and otherwise requires the image to have `n`.
    """
    check_channels(channels)
    C = image.shape[0]
    if channels == "keep":
        return image
    if channels == "rgb" or channels == 3:
        if C in (1, 2):  # gray (+ alpha)
            return image[:1].expand(3, -1, -1).contiguous()
        if C in (3, 4):  # RGB (+ alpha)
            return image[:3]
        raise ValueError(f"cannot convert a {C}-channel image to RGB (a {C}-channel model takes it)")
    if channels == "gray" or channels == 1:
        if C in (1, 2):
            return image[:1]
        if C in (3, 4):
            return torch.einsum("c,chw->hw", _LUMA, image[:3])[None]  # [1, H, W]
        return image.mean(0, keepdim=True)  # multi-band: no standard luma, the band average
    if C != channels:
        raise ValueError(f"image has {C} channels, {channels} were asked for")
    return image


def check_channels(channels: Channels) -> None:
    """ValueError unless `channels` is a channel mode: keep, rgb, gray or a positive count."""
    if not (channels in ("keep", "rgb", "gray") or (type(channels) is int and channels > 0)):
        raise ValueError(f"channels must be 'keep', 'rgb', 'gray' or a positive int, got {channels!r}")


def _read_pil(source: Path | bytes) -> np.ndarray:
    """`[H, W, C]` array from PIL (uint8, uint16, int32 or float32)."""
    with Image.open(_open(source)) as img:
        img.load()  # Image.open is lazy; a truncated file only fails here
        mode = _PIL_CONVERT.get(img.mode)
        if img.mode == "P" and "transparency" in img.info:
            mode = "RGBA"
        if mode is not None:
            img = img.convert(mode)
        array = np.asarray(img)
        if img.mode == "I":
            # 32-bit integer mode is how PIL hands over 16-bit grayscale from several formats.
            array = array.astype(np.uint16) if array.min() >= 0 and array.max() < 2**16 else array
    return array[:, :, None] if array.ndim == 2 else array


def _read_tiff(source: Path | bytes) -> np.ndarray:
    """`[H, W, C]` array from tifffile (any band count), or from PIL when tifffile is missing.

    Without tifffile, a TIFF PIL cannot read (more than 4 bands, say) raises `MissingExtraError`.
    """
    if not extras.available("tifffile"):
        try:
            return _read_pil(source)
        except Exception as error:
            raise MissingExtraError(
                f"{_describe(source, None)}: PIL cannot read this TIFF, and "
                f"{extras.missing_extra_message('tifffile')}"
            ) from error
    tifffile = extras.require("tifffile")
    try:
        with tifffile.TiffFile(_open(source)) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except ValueError as error:
        # A compression that needs the optional `imagecodecs` package: PIL may still decode it.
        # (No fallback otherwise: PIL would read, e.g., only the first band of a damaged file.)
        if "imagecodecs" not in str(error):
            raise
        return _read_pil(source)
    return _tiff_to_hwc(array, axes)


def _tiff_to_hwc(array: np.ndarray, axes: str) -> np.ndarray:
    """Move the rows (Y) and columns (X) first and whatever single axis is left (bands) last."""
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF without image rows/columns (axes {axes!r})")
    # Drop length-1 axes other than Y/X, e.g. a single page or time point.
    keep = [i for i, a in enumerate(axes) if a in "YX" or array.shape[i] > 1]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if len(axes) == 2:
        return array[:, :, None] if axes == "YX" else array.T[:, :, None]
    if len(axes) != 3:
        raise ValueError(f"TIFF has {len(axes) - 2} non-spatial axes ({axes!r}); one band axis is supported")
    band = next(i for i, a in enumerate(axes) if a not in "YX")
    return np.moveaxis(array, (axes.index("Y"), axes.index("X"), band), (0, 1, 2))


def _to_unit_tensor(array: np.ndarray) -> torch.Tensor:
    """`[H, W, C]` array -> float32 `[C, H, W]`: integer types divided by their maximum, floats unchanged."""
    chw = np.array(np.moveaxis(array, 2, 0), order="C")  # always a copy: PIL's arrays are read-only
    if chw.dtype == np.uint8:  # the common case, about twice as fast when converted by torch
        return torch.from_numpy(chw).float().div_(255)
    scale = np.iinfo(chw.dtype).max if np.issubdtype(chw.dtype, np.integer) else 1
    # astype also gives the native byte order torch needs (TIFFs may be big-endian).
    return torch.from_numpy(chw.astype(np.float32) / np.float32(scale))
