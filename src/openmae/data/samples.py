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
