"""The pretraining augmentation fused with a reduced-size JPEG decode by libjpeg-turbo (`simplejpeg`).

The same idea as `openmae.data.jpeg` (draw the crop box from the header, then let the decoder
scale in the DCT domain as far as the box still covers the output size), done faster: libjpeg-turbo
decodes (at 1, 1/2, 1/4 or 1/8: its other n/8 scales blur), and the crop is resized by torch's
uint8 antialiased bicubic kernel, which is faster than PIL's. Boxes and flips come from the same
random draws as the PIL path, so a seed gives the same crop with either decoder (up to resampling
detail).

JPEGs that libjpeg-turbo cannot turn into RGB (CMYK, for one) take the PIL path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers import to_2tuple
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from openmae import extras
from openmae.data.jpeg import (
    Box,
    FusedJpegAugment,
    JpegPretrainTransform,
    Source,
    draw_views,
    normalize_uint8,
    smallest_box,
)
from openmae.data.transforms import Size


def turbo_crops(data: bytes, boxes: Sequence[Box], size: Size) -> list[tuple[torch.Tensor, Box]]:
    """Decode a JPEG once, at the smallest of the scales 1, 1/2, 1/4, 1/8 at which every box
    (full-size pixels) still covers `size`, and resize each box's region to `size` (bicubic,
    antialiased).

    A region is its box rounded to whole decoded pixels: its corners move by at most half a
    decoded pixel, which is at most half an output pixel. Returns, per box, the uint8 crop
    `[3, *size]` and the box it covers, in full-size pixels.

    Raises:
        ValueError: libjpeg-turbo cannot decode these bytes to RGB.
    """
    simplejpeg = extras.require("simplejpeg")
    out_h, out_w = to_2tuple(size)
    full_h, full_w, _, _ = simplejpeg.decode_jpeg_header(data)
    h, w = smallest_box(boxes)
    reduce = 1  # 1, 2, 4 or 8: the scales whose IDCT keeps full quality (the n/8 ones blur: measured)
    while reduce < 8 and h / (2 * reduce) >= out_h and w / (2 * reduce) >= out_w:
        reduce *= 2
    # libjpeg-turbo decodes at the largest scale that gives at least this size: exactly 1/reduce.
    decoded = simplejpeg.decode_jpeg(
        data, "RGB", min_height=math.ceil(full_h / reduce), min_width=math.ceil(full_w / reduce)
    )  # [h', w', 3] uint8
    # HWC memory seen as [1, 3, h, w] channels-last: torch's fast uint8 resampling path.
    image = torch.from_numpy(decoded).permute(2, 0, 1)[None]
    crops = []
    for top, left, box_h, box_w in boxes:
        # Decoded pixel i covers full-size pixels [i * reduce, (i + 1) * reduce).
        rows = _decoded_span(top, box_h, reduce, decoded.shape[0])
        cols = _decoded_span(left, box_w, reduce, decoded.shape[1])
        # A contiguous channels-last copy: the resampling kernel runs ~2x faster on it than on a view.
        region = image[:, :, rows, cols].contiguous(memory_format=torch.channels_last)
        crop = F.resize(region, [out_h, out_w], InterpolationMode.BICUBIC, antialias=True)[0]
        covered = (
            rows.start * reduce,
            cols.start * reduce,
            (rows.stop - rows.start) * reduce,
            (cols.stop - cols.start) * reduce,
        )
        crops.append((crop, covered))
    return crops


def _decoded_span(start: int, length: int, reduce: int, limit: int) -> slice:
    """Full-size pixels [start, start + length) in decoded pixels, each end rounded to a whole one."""
    first = min(round(start / reduce), limit - 1)
    return slice(first, min(max(round((start + length) / reduce), first + 1), limit))


@dataclass(frozen=True)
class TurboJpegPretrainTransform(FusedJpegAugment):
    """`JpegPretrainTransform` with libjpeg-turbo decoding: a JPEG file or its bytes -> normalised
    `[3, *img_size]`, the same augmentation from the same random draws.

    Raises:
        UnreadableImageError: the JPEG cannot be decoded by libjpeg-turbo nor by PIL.
    """

    def views(self, source: Source, seeds: Sequence[int] | None, name: str | None = None) -> torch.Tensor:
        """`[k, 3, *img_size]`: one view per seed (see `draw_views`), all cut from one decode."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        simplejpeg = extras.require("simplejpeg")
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            views = draw_views(height, width, seeds, self.crop_scale, self.hflip)
            crops = turbo_crops(data, [view.box for view in views], self.img_size)  # [3, H, W] uint8 each
        except ValueError:
            # Not decodable to RGB here (CMYK, damaged...): PIL decodes it or says it is unreadable.
            # (A file goes to PIL by its path, which PIL's messages then name.)
            fallback = JpegPretrainTransform(self.img_size, self.mean, self.std, self.crop_scale, self.hflip)
            return fallback.views(data, seeds, name or (None if isinstance(source, bytes) else str(source)))
        flipped = [crop.flip(-1) if view.flip else crop for (crop, _), view in zip(crops, views, strict=True)]
        return normalize_uint8(torch.stack(flipped), self.mean, self.std)
