"""Real photographs to try openmae on without a dataset: the sample images that scikit-image and
scikit-learn ship (the `photos` extra), written as JPEG folders at chosen sizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from openmae.extras import require

PHOTO_SIZES = (320, 500, 800)  # longer side in pixels; ImageNet photos are mostly ~500 x 375


def sample_photos() -> dict[str, np.ndarray]:
    """Colour photographs shipped with scikit-image and scikit-learn, `[H, W, 3]` uint8 each."""
    require("skimage"), require("sklearn")  # one line naming the extra when they are missing
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    photos["hubble_deep_field"] = skimage.data.hubble_deep_field()
    sklearn_images = load_sample_images()
    for filename, image in zip(sklearn_images.filenames, sklearn_images.images, strict=True):
        photos[Path(filename).stem] = image
    return photos


def make_photo_folder(root: str | Path, sizes: Sequence[int] = PHOTO_SIZES, quality: int = 90) -> Path:
    """Write every sample photo as a JPEG at each longer-side size in `sizes`; returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, array in sample_photos().items():
        image = Image.fromarray(array).convert("RGB")
        for size in sizes:
            scale = size / max(image.size)
            resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            resized.save(root / f"{name}_{size}.jpg", quality=quality)
    return root


def make_sized_photos(
    root: str | Path, size: tuple[int, int], copies: int = 1, quality: int = 90, seed: int = 0
) -> list[Path]:
    """Write every sample photo `copies` times as a JPEG of exactly `size` = (width, height): each
    copy a seeded crop (80-100% of the largest window of that aspect) resized by bicubic, so the
    copies are distinct images. Returns the files written."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    files = []
    for name, array in sample_photos().items():
        image = Image.fromarray(array).convert("RGB")
        fit = min(image.width / width, image.height / height)  # the largest window of the aspect
        for copy in range(copies):
            scale = fit * rng.uniform(0.8, 1.0)
            w, h = width * scale, height * scale
            left, top = rng.uniform(0, image.width - w), rng.uniform(0, image.height - h)
            window = image.resize(size, Image.BICUBIC, box=(left, top, left + w, top + h))
            files.append(root / f"{name}_{copy:03d}.jpg")
            window.save(files[-1], quality=quality)
    return files
