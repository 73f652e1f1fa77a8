"""JPEG decoding on the GPU (`data.decoder=gpu`): the loader workers read the bytes and draw the
views; the training process decodes each micro-batch's JPEGs in one batched call
(`torchvision.io.decode_jpeg(device="cuda")`, nvJPEG) and crops, flips and normalises there.

What stays in the workers is reading a file and parsing its header (the size the crop boxes need),
so a GPU needs far fewer CPU cores to stay fed. The price: nvJPEG decodes at full size (no DCT
scaling), on the GPU, in the training process's stream (a few ms per batch, small next to a ViT
step). The crops are `pretrain_transform`'s float RandomResizedCrop (bicubic, antialiased) of the
boxes and flips every decoder draws for a seed, so a seed gives the same view as with pil or turbo,
up to resampling detail. The same code runs on CPU tensors (`device="cpu"`: libjpeg through
torchvision), which is how it is tested on machines without a GPU.

Non-JPEG images are decoded and augmented in the workers as with the other decoders. An image that
the batched decode rejects is decoded alone, then by PIL, and skipped (counted) if neither can.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (`torchcodec.decoders.
decode_jpeg`, on CUDA too); the one call is in `GpuJpegDecoder.decode`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from timm.layers import to_2tuple
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from openmae.data.feed import MicroBatch, TrainFeed
from openmae.data.folder import UnreadableImageWarning
from openmae.data.images import UnreadableImageError, read_image
from openmae.data.jpeg import FusedJpegAugment, Source, View, draw_views, open_image
from openmae.data.transforms import Size


class PendingJpeg(NamedTuple):
    """A JPEG left for the device to decode, and the views to cut from it."""

    data: torch.Tensor  # uint8 [n]: the encoded bytes
    views: list[View]
    name: str


@dataclass(frozen=True)
class GpuJpegPlan(FusedJpegAugment):
    """The workers' half: a JPEG's bytes and its views' draws (from its header), no pixels decoded.

    Fields as the other fused JPEG transforms; `mean` and `std` are applied by `GpuJpegDecoder`.

    Raises:
        UnreadableImageError: the header cannot be read.
    """

    def views(self, source: Source, seeds: Sequence[int] | None, name: str | None = None) -> PendingJpeg:
        where = name or ("<image bytes>" if isinstance(source, bytes) else str(source))
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            with open_image(data) as image:  # the header only
                height, width = image.height, image.width
        except Exception as error:
            raise UnreadableImageError(f"cannot read image {where}: {error}") from error
        views = draw_views(height, width, seeds, self.crop_scale, self.hflip)
        return PendingJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), views, where)


class GpuJpegDecoder:
    """The training process's half: decode a micro-batch's pending JPEGs on `device` in one call,
    then crop, flip and normalise each view there."""

    def __init__(self, img_size: Size, mean: Sequence[float], std: Sequence[float], device) -> None:
        self.size = list(to_2tuple(img_size))
        self.mean, self.std = list(mean), list(std)
        self.device = torch.device(device)
        self.warned: set[str] = set()

    def __call__(self, entries: list) -> tuple[torch.Tensor, torch.Tensor]:
        """`entries`: per image, its views already made (`[k, 3, H, W]`, a non-JPEG) or a
        `PendingJpeg`. Returns the views `[N, 3, H, W]` on the device and, per sample of the
        entries, whether it is among them (False: an unreadable image's views)."""
        pending = [entry for entry in entries if isinstance(entry, PendingJpeg)]
        decoded = iter(self.decode(pending))
        views, kept = [], []
        for entry in entries:
            if isinstance(entry, PendingJpeg):
                image = next(decoded)
                if image is None:
                    kept += [False] * len(entry.views)
                    continue
                views.append(self.crop(image, entry.views))
            else:
                views.append(entry.to(self.device, non_blocking=True))
            kept += [True] * len(views[-1])
        images = torch.cat(views) if views else torch.empty(0, device=self.device)
        return images, torch.tensor(kept, dtype=torch.bool)

    def decode(self, pending: list[PendingJpeg]) -> list[torch.Tensor | None]:
        """`[3, h, w]` per JPEG (uint8 from nvJPEG / libjpeg, float from PIL), None if unreadable."""
        if not pending:
            return []
        try:
            return decode_jpeg([p.data for p in pending], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad image fails the batch: find it
            return [self.decode_one(p) for p in pending]

    def decode_one(self, pending: PendingJpeg) -> torch.Tensor | None:
        try:
            return decode_jpeg(pending.data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:  # e.g. a colour space the device decoder lacks
            return read_image(pending.data.numpy().tobytes(), "rgb", pending.name).to(self.device)
        except UnreadableImageError as error:
            if pending.name not in self.warned:
                self.warned.add(pending.name)
                warnings.warn(
                    f"skipping unreadable image {pending.name}: {error.__cause__}", UnreadableImageWarning, 2
                )
            return None

    def crop(self, image: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
        """`[k, 3, H, W]`: each view's box resized (float, bicubic, antialiased), flipped, normalised."""
        crops = []
        for (top, left, height, width), flip in views:
            region = image[:, top : top + height, left : left + width]
            region = region.float().div_(255) if region.dtype == torch.uint8 else region
            crop = F.resize(region, self.size, InterpolationMode.BICUBIC, antialias=True)
            crops.append(crop.flip(-1) if flip else crop)
        return F.normalize(torch.stack(crops), self.mean, self.std)


class GpuDecodedFeed:
    """A `TrainFeed` whose loader leaves JPEGs pending (`GpuJpegPlan`): they are decoded here, in
    the training process, as each micro-batch is taken."""

    def __init__(self, feed: TrainFeed, decoder: GpuJpegDecoder) -> None:
        self.feed, self.decoder = feed, decoder
        self.epoch_images = feed.epoch_images

    def batches(self, epoch: int, start: int) -> Iterator[MicroBatch]:
        for images, labels, seeds, skipped in self.feed.batches(epoch, start):
            if isinstance(images, list):  # some images still encoded
                images, kept = self.decoder(images)
                labels, seeds, skipped = labels[kept], seeds[kept], skipped + int((~kept).sum())
            yield images, labels, seeds, skipped

    def close(self) -> None:
        self.feed.close()
