"""From an encoded image (a file, or its bytes from a shard or a dataset row) to the training tensor.

One function for every dataset, so a JPEG takes the fused decode + augmentation path of the decoder
chosen (`data.decoder`: PIL's draft mode, libjpeg-turbo, or the GPU) wherever it is stored, and
every other image is decoded to float, converted to the channels asked for, then transformed.
Training decodes an image once and augments it once per seed (`load_views`: repeated views).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from openmae import extras
from openmae.data.images import Channels, read_image
from openmae.data.jpeg import JpegPretrainTransform, Source, is_jpeg, is_jpeg_bytes
from openmae.data.sampler import seeded_rng
from openmae.data.transforms import Size

DECODERS = ("auto", "pil", "turbo", "gpu")

Transform = Callable[[torch.Tensor], torch.Tensor]


class JpegTransform(Protocol):
    """A JPEG's decode fused with the pretraining augmentation; raises `UnreadableImageError`."""

    def views(self, source: Source, seeds: Sequence[int] | None, name: str | None = None):
        """`[k, 3, H, W]`, view i drawn under `seeds[i]` (`gpu.PendingJpeg` for the GPU decoder)."""
        ...


def resolve_decoder(decoder: str) -> str:
    """ "pil", "turbo" or "gpu": `auto` picks turbo when `simplejpeg` is installed (the `turbo`
    extra), else pil.

    Raises:
        MissingExtraError: "turbo" was asked for and simplejpeg is not installed.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
    if decoder == "auto":
        return "turbo" if extras.available("simplejpeg") else "pil"
    if decoder == "turbo":
        extras.require("simplejpeg")  # one line naming the extra when it is missing
    return decoder


def jpeg_pretrain_transform(
    decoder: str,
    img_size: Size,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
) -> JpegTransform:
    """The fused JPEG decode + pretraining augmentation of `decoder` (auto | pil | turbo | gpu)."""
    from openmae.data.gpu import GpuJpegPlan
    from openmae.data.turbo import TurboJpegPretrainTransform

    classes = {"pil": JpegPretrainTransform, "turbo": TurboJpegPretrainTransform, "gpu": GpuJpegPlan}
    return classes[resolve_decoder(decoder)](img_size, tuple(mean), tuple(std), tuple(crop_scale), hflip)


def load_image(
    source: Source,
    channels: Channels,
    transform: Transform | None = None,
    jpeg_transform: Callable | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """The decoded, transformed image of a file or of encoded bytes (`name`: their origin, for messages).

    A JPEG (by its file name, or by its first bytes) goes to `jpeg_transform(source, name)` when
    one is given; its random draws, like the transform's, come from torch's global RNG.

    Raises:
        UnreadableImageError: the image cannot be decoded.
    """
    if jpeg_transform is not None and _is_jpeg(source):
        return jpeg_transform(source, name)
    image = read_image(source, channels, name)
    return image if transform is None else transform(image)


def load_views(
    source: Source,
    seeds: Sequence[int],
    channels: Channels,
    transform: Transform | None = None,
    jpeg_transform: JpegTransform | None = None,
    name: str | None = None,
):
    """`[k, C, H, W]`: the image decoded once, view i transformed under `seeded_rng(seeds[i])`.

    A JPEG goes to `jpeg_transform.views` when one is given (with `data.decoder=gpu` it returns a
    `gpu.PendingJpeg`, decoded later on the device).

    Raises:
        UnreadableImageError: the image cannot be decoded.
    """
    if jpeg_transform is not None and _is_jpeg(source):
        return jpeg_transform.views(source, seeds, name)
    image = read_image(source, channels, name)
    views = []
    for seed in seeds:
        with seeded_rng(seed):
            views.append(image if transform is None else transform(image))
    return torch.stack(views)


def _is_jpeg(source: Source) -> bool:
    return is_jpeg_bytes(source) if isinstance(source, bytes) else is_jpeg(Path(source))


@dataclass(frozen=True)
class ImageLoader:
    """`load_views` with its settings bound: `(source, seeds, name) -> views`, as streaming feeds call it."""

    channels: Channels
    transform: Transform | None = None
    jpeg_transform: JpegTransform | None = None

    def __call__(self, source: Source, seeds: Sequence[int], name: str | None = None):
        return load_views(source, seeds, self.channels, self.transform, self.jpeg_transform, name)
