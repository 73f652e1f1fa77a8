"""From an encoded image (a file, or its bytes from a shard or a dataset row) to the training tensor.

One function for every dataset, so a JPEG takes the fused decode + augmentation path
(`JpegPretrainTransform` / `TurboJpegPretrainTransform`) wherever it is stored, and every other
image is decoded to float, converted to the channels asked for, then transformed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from openmae.data.images import Channels, read_image
from openmae.data.jpeg import Source, is_jpeg, is_jpeg_bytes

Transform = Callable[[torch.Tensor], torch.Tensor]
JpegTransform = Callable[..., torch.Tensor]  # (source, name) -> tensor; raises UnreadableImageError


def load_image(
    source: Source,
    channels: Channels,
    transform: Transform | None = None,
    jpeg_transform: JpegTransform | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """The decoded, transformed image of a file or of encoded bytes (`name`: their origin, for messages).

    A JPEG (by its file name, or by its first bytes) goes to `jpeg_transform` when one is given.

    Raises:
        UnreadableImageError: the image cannot be decoded.
    """
    if jpeg_transform is not None and _is_jpeg(source):
        return jpeg_transform(source, name)
    image = read_image(source, channels, name)
    return image if transform is None else transform(image)


def _is_jpeg(source: Source) -> bool:
    return is_jpeg_bytes(source) if isinstance(source, bytes) else is_jpeg(Path(source))


@dataclass(frozen=True)
class ImageLoader:
    """`load_image` with its settings bound: `(source, name) -> tensor`, as streaming feeds call it."""

    channels: Channels
    transform: Transform | None = None
    jpeg_transform: JpegTransform | None = None

    def __call__(self, source: Source, name: str | None = None) -> torch.Tensor:
        return load_image(source, self.channels, self.transform, self.jpeg_transform, name)
