"""Reduced-size JPEG decoding: same crops as a full decode, a real reduction, and the training dataset."""

import math
import warnings

import numpy as np
import pytest
import simplejpeg
import skimage.data
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from openmae import extras
from openmae.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    JpegPretrainTransform,
    UnreadableImageError,
    UnreadableImageWarning,
    build_dataset,
    build_loader,
    pretrain_transform,
    read_image,
)
from openmae.data import decode as decode_module
from openmae.data.decode import resolve_decoder
from openmae.data.jpeg import decode_crops, draft_decode
from openmae.data.sampler import SeededDataset, seeded_rng
from openmae.data.turbo import TurboJpegPretrainTransform, turbo_crops
from openmae.extras import MissingExtraError

WIDTH, HEIGHT = 500, 333  # an ImageNet-like photo; the odd height must not stop the reduction


def save_photo(path, mode="RGB"):
    image = Image.fromarray(skimage.data.astronaut()).resize((WIDTH, HEIGHT), Image.BICUBIC)
    image.convert(mode).save(path, quality=90)
    return path


@pytest.fixture
def photo(tmp_path):
    return save_photo(tmp_path / "astronaut.jpg")


def to_unit(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # [3, H, W]


def full_decode_crop(full: torch.Tensor, box, size: int) -> torch.Tensor:
    """The existing path: crop-resize a full-size float decode (bicubic, antialiased)."""
    return F.resized_crop(full, *box, [size, size], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)


@pytest.mark.parametrize(
    ("box", "size", "scale"),
    [((10, 60, 300, 300), 112, 1 / 2), ((10, 60, 300, 300), 64, 1 / 4), ((10, 20, 280, 420), 32, 1 / 8)],
)
def test_draft_crop_matches_the_full_decode_crop_of_the_same_box(photo, box, size, scale):
    with Image.open(photo) as image:
        assert draft_decode(image, box[2:], size)[1] == scale
    draft = to_unit(decode_crops(photo, [box], size)[0])
    full = read_image(photo, "rgb")
    same = full_decode_crop(full, box, size)
    top, left, h, w = box
    shifted = full_decode_crop(full, (top + h // 20, left + w // 20, h, w), size)
    # Measured: 0.005 (1/2), 0.010 (1/4), 0.012 (1/8); the box moved by 5% of its sides: 0.17-0.18.
    assert (draft - same).abs().mean() < 0.03
    assert (draft - shifted).abs().mean() > 0.1


def test_decoder_reduces_only_as_far_as_the_crop_allows(photo, tmp_path):
    whole = (HEIGHT, WIDTH)
    for size, scale in ((224, 1), (160, 1 / 2), (64, 1 / 4), (32, 1 / 8), (16, 1 / 8)):
        with Image.open(photo) as image:
            decoded, got = draft_decode(image, whole, size)
        assert got == scale
        assert decoded.size == (math.ceil(WIDTH * scale), math.ceil(HEIGHT * scale))
        assert min(HEIGHT * got, WIDTH * got) >= size
    png = tmp_path / "astronaut.png"
    with Image.open(photo) as image:
        image.save(png)
    with Image.open(png) as image:
        decoded, got = draft_decode(image, whole, 32)
    assert got == 1 and decoded.size == (WIDTH, HEIGHT)


def jpeg_folder(root, names=("a.jpg", "b.jpeg")):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_photo(root / name)
    return root


@pytest.mark.parametrize(
    ("decoder", "cls"), [("pil", JpegPretrainTransform), ("turbo", TurboJpegPretrainTransform)]
)
def test_training_folders_of_rgb_jpegs_take_the_fast_path_and_nothing_else(tmp_path, decoder, cls):
    root = str(jpeg_folder(tmp_path / "train"))
    train = build_dataset(DataConfig(path=root, decoder=decoder), "train", 64, 3)
    assert train.jpeg_transform == cls(64, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
    assert build_dataset(DataConfig(path=root, fast_decode=False), "train", 64, 3).jpeg_transform is None
    assert build_dataset(DataConfig(path=root, channels="gray"), "train", 64, 1).jpeg_transform is None
    # "keep" trains on the model's channels: RGB for a 3-channel model (the fast path), gray for 1.
    assert build_dataset(DataConfig(path=root, channels="keep"), "train", 64, 3).jpeg_transform is not None
    assert build_dataset(DataConfig(path=root, channels="keep"), "train", 64, 1).jpeg_transform is None
    evaluation = build_dataset(DataConfig(path=root, val_path=root), "val", 64, 3, train_transform=False)
    assert evaluation.jpeg_transform is None


def test_fast_item_is_normalised_and_replayed_exactly_from_its_seed(tmp_path):
    save_photo(jpeg_folder(tmp_path) / "gray.jpg", mode="L")
    dataset = SeededDataset(build_dataset(DataConfig(path=str(tmp_path)), "train", 64, 3))
    (image,), label, seeds = dataset[0, (1234,)]
    assert image.shape == (3, 64, 64) and label == -1 and seeds == (1234,)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = image * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and image.min() < 0
    assert torch.equal(dataset[0, (1234,)][0][0], image)  # a resumed run sees the same crop and flip
    assert not torch.equal(dataset[0, (1235,)][0][0], image)
    gray = dataset[2, (0,)][0][0] * std + mean  # a grayscale JPEG repeated to RGB, as `read_image` does
    torch.testing.assert_close(gray[0], gray[1], atol=1e-6, rtol=0)


def test_png_files_keep_the_existing_path(tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path, names=("a.jpg",))
    with Image.open(root / "a.jpg") as image:
        image.save(root / "b.png")
    dataset = build_dataset(DataConfig(path=str(root)), "train", 64, 3)
    calls = []
    real_read_image = decode_module.read_image
    monkeypatch.setattr(decode_module, "read_image", lambda *a: calls.append(a[0]) or real_read_image(*a))
    assert [dataset[i][0].shape for i in range(2)] == [(3, 64, 64)] * 2
    assert [p.name for p in calls] == ["b.png"]


def test_unreadable_jpegs_are_skipped_and_counted(tmp_path):
    root = jpeg_folder(tmp_path, names=("good.jpg",))
    (root / "truncated.jpg").write_bytes((root / "good.jpg").read_bytes()[:300])
    (root / "zero.jpg").write_bytes(b"")
    dataset = build_dataset(DataConfig(path=str(root)), "train", 64, 3)
    assert dataset.jpeg_transform is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batch,) = list(build_loader(dataset, batch_size=3))
    assert batch.images.shape == (1, 3, 64, 64) and batch.num_skipped == 2
    assert [w.category for w in caught] == [UnreadableImageWarning] * 2
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in messages and "zero.jpg" in messages


# ------------------------------------------------------------------------------------------------------
# libjpeg-turbo (data.decoder=turbo)


@pytest.mark.parametrize(
    ("box", "size", "scale"),
    [
        ((10, 60, 300, 300), 224, 1),
        ((10, 60, 300, 300), 112, 1 / 2),
        ((10, 60, 300, 300), 64, 1 / 4),
        ((10, 20, 280, 420), 32, 1 / 8),
        ((13, 55, 281, 301), 32, 1 / 8),
    ],
)
def test_turbo_crop_matches_the_full_decode_crop_of_the_box_it_covers(photo, box, size, scale, monkeypatch):
    decoded = []
    real_decode = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        decoded.append(real_decode(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    ((crop, covered),) = turbo_crops(photo.read_bytes(), [box], size)
    turbo = crop.float() / 255  # [3, size, size]
    full = read_image(photo, "rgb")
    top, left, h, w = box
    # Decoded at the smallest of the scales 1, 1/2, 1/4, 1/8 at which the box still covers the size.
    (image,) = decoded
    reduce = round(WIDTH / image.shape[1])
    assert min(h, w) / reduce >= size > min(h, w) / (2 * reduce) and reduce == round(scale**-1)
    # The box is rounded to whole decoded pixels: its corners move by half a decoded pixel at most.
    corners = lambda b: np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]])  # noqa: E731
    assert np.abs(corners(covered) - corners(box)).max() <= reduce / 2
    same = full_decode_crop(full, covered, size)
    shifted = full_decode_crop(full, (top + h // 20, left + w // 20, h, w), size)
    # The draft-mode tolerance: a real image difference (the box moved by 5%) is > 0.1.
    assert (turbo - same).abs().mean() < 0.03
    assert (turbo - shifted).abs().mean() > 0.1


@pytest.mark.parametrize("size", [(2000, 1500), (500, 333)])
def test_decoders_give_the_same_crop_and_flip_for_the_same_seed(tmp_path, size):
    path = tmp_path / "photo.jpg"
    Image.fromarray(skimage.data.astronaut()).resize(size, Image.BICUBIC).save(path, quality=90)
    args = (224, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    reference = pretrain_transform(*args)  # full decode, float RandomResizedCrop, flip, normalise
    full = read_image(path, "rgb")
    for seed in range(4):
        crops = []
        decoders = (TurboJpegPretrainTransform(*args), JpegPretrainTransform(*args))
        for transform in (*decoders, lambda path: reference(full)):
            with seeded_rng(seed):
                crops.append(transform(path) * std + mean)  # [3, 224, 224] in [0, 1]
        turbo, pil, exact = crops
        assert (turbo - exact).abs().mean() < 0.03 and (pil - exact).abs().mean() < 0.03


def test_turbo_reads_gray_and_cmyk_jpegs_as_rgb_and_rejects_damaged_ones(tmp_path):
    transform = TurboJpegPretrainTransform(32, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    gray = transform(save_photo(tmp_path / "gray.jpg", mode="L")) * std + mean
    torch.testing.assert_close(gray[0], gray[1], atol=1e-6, rtol=0)
    cmyk = save_photo(tmp_path / "cmyk.jpg", mode="CMYK")  # libjpeg-turbo gives no RGB: PIL's path
    assert transform(cmyk).shape == (3, 32, 32)
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        transform(b"\xff\xd8\xff\xe0 broken", "broken.jpg")


def test_auto_picks_turbo_when_simplejpeg_is_installed_else_pil(monkeypatch):
    assert resolve_decoder("auto") == "turbo" and resolve_decoder("pil") == "pil"
    monkeypatch.setattr(
        extras.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name))
    )
    assert resolve_decoder("auto") == "pil"
    with pytest.raises(MissingExtraError, match="openmae\\[turbo\\]"):
        resolve_decoder("turbo")
    with pytest.raises(ValueError, match="decoder"):
        DataConfig(decoder="fast")
