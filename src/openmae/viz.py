"""Pictures of what an MAE reconstructs, laid out like the paper's Figure 2.

Each image becomes a row of four panels:

    original | masked | reconstruction | reconstruction + visible

- *masked*: the visible patches as they are, every hidden patch set to 0 in the model's input space,
  which after un-normalisation is the dataset's mean colour (the grey or dark squares of the paper).
- *reconstruction*: the decoder's prediction for every patch, visible ones included.
- *reconstruction + visible*: the prediction on hidden patches, the original pixels on visible ones.

Models trained with `norm_pix_loss` predict each patch normalised by its own mean and variance; their
predictions are mapped back to pixels with the statistics of the same patch of the original (that
is information the model never saw for hidden patches, so only the patch's structure is the model's).

Panels are shown un-normalised with the dataset's mean/std and clipped to [0, 1]. One channel is
shown in gray; three as RGB; more than three as RGB from the first three channels; two as channel 0
in gray.

The masking is reproducible: a `torch.Generator` (or an integer `seed`) draws the `[B, L]` noise that
the model's random masking sorts, on the CPU, so the same seed gives the same picture on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from openmae.models.patches import denormalize_patches, patchify, unpatchify

# Small images are magnified to about this many pixels per side so 28x28 inputs are legible.
TARGET_PANEL_SIZE = 112
SEPARATOR = 2  # pixels of background between panels and between rows
TITLE_HEIGHT = 16  # pixels of the title band above the first row
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)

# Long and short form of each column title; the short one is used when the long one does not fit.
_TITLES = (
    ("original", "orig."),
    ("masked {ratio:.0%}", "{ratio:.0%}"),
    ("reconstruction", "recon."),
    ("recon. + visible", "+ vis."),
)


@dataclass
class Reconstruction:
    """The four panels of a reconstruction figure, in the model's (normalised) input space.

    Attributes:
        original: `[B, C, H, W]` the input images.
        masked: `[B, C, H, W]` the input with hidden patches set to 0.
        reconstruction: `[B, C, H, W]` the prediction for every patch (in pixels, also with
            `norm_pix_loss`).
        pasted: `[B, C, H, W]` the prediction on hidden patches, the input on visible ones.
        mask: `[B, L]` 1 = hidden, 0 = visible.
        loss: scalar, the model's loss on this batch.
        mask_ratio: share of the patches that were hidden.
    """

    original: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    pasted: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor
    mask_ratio: float

    def panels(self) -> tuple[torch.Tensor, ...]:
        """The four `[B, C, H, W]` panels, left to right."""
        return (self.original, self.masked, self.reconstruction, self.pasted)


# ---------------------------------------------------------------------------------------------------------
# Running the model


def reconstruct(
    model: nn.Module,
    imgs: torch.Tensor,
    mask_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Reconstruction:
    """Mask, encode and decode `imgs` and return the four panels of the figure (on the CPU).

    Args:
        model: a :class:`~openmae.models.MaskedAutoencoder`; it is run in eval mode and its
            train/eval mode is restored afterwards.
        imgs: `[B, C, H, W]` normalised images, `(x - mean) / std`, of the model's size.
        mask_ratio: share of patches to hide.
        generator: random source of the masking noise (default: torch's global one). With the
            model's `mask_sampling` set to "block" it seeds the blocks instead; "grid" ignores it.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _reconstruct(model, imgs, mask_ratio, generator)
    finally:
        model.train(was_training)


def _reconstruct(
    model: nn.Module, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None
) -> Reconstruction:
    device = next(model.parameters()).device
    B = imgs.shape[0]
    if model.config.mask_sampling == "random":
        # Drawn on the generator's device (the CPU by default), so a seed means the same mask everywhere.
        noise = torch.rand(B, model.num_patches, generator=generator, device=_device_of(generator))
        out = model(imgs.to(device), mask_ratio=mask_ratio, noise=noise)
    else:
        out = model(imgs.to(device), mask_ratio=mask_ratio, generator=generator)
    imgs = imgs.detach().float().cpu()
    pred = out.pred.float().cpu()  # [B, L, P*P*C]
    mask = out.mask.float().cpu()  # [B, L]
    P, grid = model.patch_size, model.grid_size
    if model.config.norm_pix_loss:
        pred = denormalize_patches(pred, patchify(imgs, P))
    reconstruction = unpatchify(pred, P, grid)  # [B, C, H, W]
    hidden = mask_to_pixels(mask, P, grid, imgs.shape[1]).bool()  # [B, C, H, W]
    return Reconstruction(
        original=imgs,
        masked=imgs.masked_fill(hidden, 0.0),
        reconstruction=reconstruction,
        # torch.where, not a blend, so visible pixels are copied bit for bit.
        pasted=torch.where(hidden, reconstruction, imgs),
        mask=mask,
        loss=out.loss.detach().float().cpu(),
        mask_ratio=float(mask.mean()) if mask.numel() else mask_ratio,
    )


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def mask_to_pixels(
    mask: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int
) -> torch.Tensor:
    """Spread a `[B, L]` patch mask over the pixels of its patches: `[B, C, H, W]`."""
    per_pixel = mask[:, :, None].expand(-1, -1, patch_size * patch_size * channels)  # [B, L, P*P*C]
    return unpatchify(per_pixel, patch_size, grid_size)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def to_display(imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised `[B, C, H, W]` -> displayable `[B, 3, H, W]` in [0, 1].

    Un-normalises with `mean`/`std` (one value per channel, or a single value for all), clips to
    [0, 1], and maps channels to RGB: 1 -> gray, 2 -> channel 0 in gray, 3 -> RGB, >3 -> the first
    three as RGB.
    """
    C = imgs.shape[1]
    mean_t = _per_channel(mean, C, "mean")
    std_t = _per_channel(std, C, "std")
    pixels = (imgs.float() * std_t + mean_t).clamp(0.0, 1.0)  # [B, C, H, W]
    if C >= 3:
        return pixels[:, :3]
    return pixels[:, :1].expand(-1, 3, -1, -1)


def _per_channel(values: Sequence[float], channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name} has {t.numel()} values for {channels}-channel images")
    return t.expand(channels).reshape(1, channels, 1, 1)


def auto_scale(height: int, width: int) -> int:
    """Integer magnification that brings the longer side near `TARGET_PANEL_SIZE` (at least 1)."""
    return max(1, round(TARGET_PANEL_SIZE / max(height, width)))


def grid_size_px(batch: int, height: int, width: int, scale: int, titles: bool = True) -> tuple[int, int]:
    """`(width, height)` in pixels of the grid of :func:`make_grid_image`.

    With `s = SEPARATOR` and `t = TITLE_HEIGHT` (0 without titles):
    width  = 4 * W * scale + 3 * s,
    height = t + B * H * scale + (B - 1) * s.
    """
    title = TITLE_HEIGHT if titles else 0
    return 4 * width * scale + 3 * SEPARATOR, title + batch * height * scale + (batch - 1) * SEPARATOR


def make_grid_image(
    reconstruction: Reconstruction,
    mean: Sequence[float],
    std: Sequence[float],
    scale: int | None = None,
    titles: bool = True,
) -> Image.Image:
    """Lay the panels out as an RGB image: one row per image, four columns, titles on top.

    Panels are magnified `scale` times with nearest-neighbour (default :func:`auto_scale`, e.g. 4
    for 28x28 or 32x32 images) and separated by `SEPARATOR` pixels of white. The size is given by
    :func:`grid_size_px`.
    """
    panels = [to_display(p, mean, std) for p in reconstruction.panels()]  # 4 x [B, 3, H, W]
    B, _, H, W = panels[0].shape
    scale = auto_scale(H, W) if scale is None else scale
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    size = grid_size_px(B, H, W, scale, titles)
    canvas = Image.new("RGB", size, BACKGROUND)
    top = TITLE_HEIGHT if titles else 0
    panel_w, panel_h = W * scale, H * scale
    for col, panel in enumerate(panels):
        for row in range(B):
            x, y = col * (panel_w + SEPARATOR), top + row * (panel_h + SEPARATOR)
            canvas.paste(_to_pil(panel[row], scale), (x, y))
    if titles:
        _draw_titles(canvas, panel_w, reconstruction.mask_ratio)
    return canvas


def _to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """`[3, H, W]` in [0, 1] -> PIL image magnified `scale` times by repeating pixels."""
    pixels = (image * 255).round().to(torch.uint8)  # [3, H, W]
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # [3, H*s, W*s]
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def _draw_titles(canvas: Image.Image, panel_w: int, mask_ratio: float) -> None:
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, forms in enumerate(_TITLES):
        text = _fitting_title(draw, font, [f.format(ratio=mask_ratio) for f in forms], panel_w)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = col * (panel_w + SEPARATOR) + (panel_w - (right - left)) // 2 - left
        y = (TITLE_HEIGHT - (bottom - top)) // 2 - top
        draw.text((x, y), text, fill=TEXT_COLOR, font=font)


def _fitting_title(draw: ImageDraw.ImageDraw, font, forms: list[str], width: int) -> str:
    """The first form that fits in `width` pixels, else the shortest (it is clipped by its neighbours)."""
    for text in forms:
        if draw.textlength(text, font=font) <= width:
            return text
    return forms[-1]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float `[3, H, W]` in [0, 1] (what TensorBoard's `add_image` takes)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # [H, W, 3]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------------
# One call from a batch to a picture


def reconstruction_grid(
    model: nn.Module,
    imgs: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float = 0.75,
    seed: int = 0,
    scale: int | None = None,
    titles: bool = True,
) -> Image.Image:
    """:func:`reconstruct` with the masking drawn from `seed`, then :func:`make_grid_image`."""
    generator = torch.Generator().manual_seed(seed)
    return make_grid_image(reconstruct(model, imgs, mask_ratio, generator), mean, std, scale, titles)


def save_reconstruction_grid(
    model: nn.Module,
    imgs: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    mask_ratio: float = 0.75,
    seed: int = 0,
    scale: int | None = None,
    titles: bool = True,
) -> Path:
    """Write the reconstruction grid of normalised `imgs` `[B, C, H, W]` to the PNG file `path`.

    The same model, images and `seed` give the same bytes. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(model, imgs, mean, std, mask_ratio, seed, scale, titles).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------------------
# Image files (for `mae visualize --checkpoint C IMAGES...`)


def load_images(
    paths: Sequence[str | Path],
    img_size: int | tuple[int, int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float | None = 1.0,
) -> torch.Tensor:
    """Read image files into one normalised batch `[B, in_chans, H, W]` for :func:`reconstruct`.

    Gray and RGB files are converted to `in_chans` (1 or 3); other files must have `in_chans`
    channels. Each image's shorter side is resized to the model's size and the centre cropped
    (`crop_pct=1.0`, the default, keeps as much of the image as possible; 0.875 is the ImageNet
    evaluation crop; None stretches to the model's size).
    """
    from openmae.data.images import read_image
    from openmae.data.transforms import eval_transform

    transform = eval_transform(img_size, tuple(mean), tuple(std), crop_pct)
    return torch.stack([transform(read_image(p, channels=in_chans)) for p in paths])


__all__ = [
    "Reconstruction",
    "auto_scale",
    "grid_size_px",
    "image_to_tensor",
    "load_images",
    "make_grid_image",
    "mask_to_pixels",
    "reconstruct",
    "reconstruction_grid",
    "save_reconstruction_grid",
    "to_display",
]
