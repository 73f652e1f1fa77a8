"""Image transforms on float tensors `[C, H, W]` in [0, 1] (torchvision.transforms.v2, any channel count).

- `pretrain_transform`: the paper's MAE pretraining augmentation, RandomResizedCrop(scale 0.2-1,
  bicubic) + horizontal flip + normalisation (also the linear-probe one with scale 0.08-1).
- `eval_transform`: resize the shorter side to img_size / 0.875, centre crop (the ImageNet evaluation
  convention); or, with `crop_pct=None`, a plain resize for small images already at the model's size.
"""

from __future__ import annotations

import math

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from openmae.data.fashion_mnist import MEAN as FASHION_MNIST_MEAN
from openmae.data.fashion_mnist import STD as FASHION_MNIST_STD

IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)

Size = int | tuple[int, int]


def default_mean_std(dataset: str, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation constants: Fashion-MNIST's own for it; ImageNet's for other RGB data; else 0.5/0.5.

    The 0.5/0.5 fallback maps [0, 1] to [-1, 1]; run `compute_mean_std` (`mae stats`) for better ones.
    """
    if dataset == "fashion_mnist":
        return (FASHION_MNIST_MEAN,) * in_chans, (FASHION_MNIST_STD,) * in_chans
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def pretrain_transform(
    img_size: Size,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
    random_crop: bool = True,
    color_jitter: float = 0.0,
) -> v2.Compose:
    """Random resized crop (area share in `crop_scale`, aspect 3/4-4/3, bicubic, antialiased),
    optional horizontal flip, then `(x - mean) / std` per channel. Output `[C, *img_size]`.

    The paper's Table 1e variants: `random_crop=False` resizes instead (with `hflip=False`, no
    augmentation at all); `color_jitter` adds brightness, contrast and saturation jitter of that
    strength (1 or 3 channels; saturation changes nothing on gray images)."""
    size = to_2tuple(img_size)
    if random_crop:
        crop = v2.RandomResizedCrop(
            size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC, antialias=True
        )
    else:
        crop = v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    steps = [crop]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def eval_transform(
    img_size: Size,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float | None = 0.875,
) -> v2.Compose:
    """Deterministic: resize to `img_size / crop_pct` then centre crop `img_size`, or with
    `crop_pct=None` resize straight to `img_size`; then normalise. Output `[C, *img_size]`."""
    H, W = to_2tuple(img_size)
    if crop_pct is None:
        steps = [v2.Resize((H, W), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    else:
        # A single int resizes the shorter side (aspect kept); a non-square target scales both sides.
        scale = math.floor(H / crop_pct) if H == W else (math.floor(H / crop_pct), math.floor(W / crop_pct))
        steps = [
            v2.Resize(scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop((H, W)),
        ]
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)
