"""Decoding image files to float [C, H, W] in [0, 1], and channel conversion."""

import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from openmae.data import ImageFolderDataset, UnreadableImageError, convert_channels, decode_image, read_image
from openmae.extras import MissingExtraError


def rgb_array(h=12, w=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_is_exact_and_channel_first(tmp_path):
    array = rgb_array()
    Image.fromarray(array).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.float32 and image.shape == (3, 12, 10)
    torch.testing.assert_close(image, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def test_grayscale_png_keeps_one_channel(tmp_path):
    Image.fromarray(np.full((8, 9), 51, np.uint8)).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (1, 8, 9)
    torch.testing.assert_close(image, torch.full((1, 8, 9), 0.2))


def test_16bit_png_uses_the_full_range(tmp_path):
    array = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (1, 1, 3)
    torch.testing.assert_close(image[0, 0], torch.tensor([0.0, 1000 / 65535, 1.0]))


def test_palette_and_rgba_images(tmp_path):
    Image.fromarray(rgb_array()).convert("P").save(tmp_path / "p.png")
    rgba = np.dstack([rgb_array(), np.full((12, 10), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "p.png").shape == (3, 12, 10)
    assert read_image(tmp_path / "a.png").shape == (4, 12, 10)
    assert read_image(tmp_path / "a.png", "rgb").shape == (3, 12, 10)


@pytest.mark.parametrize("suffix", [".jpg", ".JPEG", ".webp", ".bmp"])
def test_other_formats(tmp_path, suffix):
    Image.fromarray(rgb_array()).save(tmp_path / f"x{suffix}")  # PIL picks the format from the suffix
    image = read_image(tmp_path / f"x{suffix}")
    assert image.shape == (3, 12, 10) and 0 <= image.min() and image.max() <= 1


@pytest.mark.parametrize("layout", ["contig", "planar"])
def test_six_band_uint16_tiff(tmp_path, layout):
    bands = np.random.default_rng(0).integers(0, 65536, (6, 7, 5), dtype=np.uint16)  # [C, H, W]
    if layout == "contig":
        tifffile.imwrite(
            tmp_path / "s.tif", bands.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig"
        )
    else:
        tifffile.imwrite(tmp_path / "s.tif", bands, photometric="minisblack")
    image = read_image(tmp_path / "s.tif")
    torch.testing.assert_close(image, torch.from_numpy(bands.astype(np.float32) / 65535))


def test_tiff_read_by_pil_when_tifffile_is_missing(tmp_path, monkeypatch):
    array = rgb_array()
    tifffile.imwrite(tmp_path / "rgb.tif", array, photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # makes `import tifffile` raise ImportError
    torch.testing.assert_close(
        read_image(tmp_path / "rgb.tif"), torch.from_numpy(array).permute(2, 0, 1) / 255
    )


def test_multiband_tiff_without_tifffile_names_the_extra_before_any_training(tmp_path, monkeypatch):
    bands = np.zeros((7, 5, 6), dtype=np.uint16)  # [H, W, C]: six bands, which PIL cannot read
    tifffile.imwrite(tmp_path / "s.tif", bands, photometric="minisblack", planarconfig="contig")
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'openmae\[tiff\]'"):
        read_image(tmp_path / "s.tif")
    with pytest.raises(MissingExtraError, match="s.tif"):  # the folder fails when built, not mid-run
        ImageFolderDataset(tmp_path)


def test_float_tiff_is_kept_as_stored(tmp_path):
    values = np.random.default_rng(0).normal(size=(4, 6, 5)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tiff", values, photometric="minisblack")
    torch.testing.assert_close(read_image(tmp_path / "f.tiff"), torch.from_numpy(values))


@pytest.mark.parametrize(
    "content",
    [b"", b"this is text, not a JPEG", "truncated"],
    ids=["zero-bytes", "text", "truncated"],
)
def test_unreadable_files_raise_unreadable_image_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(rgb_array(64, 64)).save(tmp_path / "full.jpg")
        content = (tmp_path / "full.jpg").read_bytes()[:300]
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        decode_image(path)


def test_truncated_tiff_is_unreadable(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", np.zeros((6, 32, 32), np.uint16), photometric="minisblack")
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError):
        decode_image(tmp_path / "t.tif")


def test_channel_modes():
    rgb = torch.rand(3, 4, 5)
    gray = torch.rand(1, 4, 5)
    bands = torch.rand(6, 4, 5)
    assert convert_channels(rgb, "keep") is rgb
    torch.testing.assert_close(convert_channels(gray, "rgb"), gray.expand(3, -1, -1))
    torch.testing.assert_close(convert_channels(gray, 3), gray.expand(3, -1, -1))
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    torch.testing.assert_close(convert_channels(rgb, "gray"), luma[None])
    torch.testing.assert_close(convert_channels(bands, "gray"), bands.mean(0, keepdim=True))
    assert convert_channels(bands, 6) is bands
    with pytest.raises(ValueError, match="6-channel image to RGB"):
        convert_channels(bands, "rgb")
    with pytest.raises(ValueError, match="6 channels, 4 were asked"):
        convert_channels(bands, 4)
    with pytest.raises(ValueError, match="channels must be"):
        convert_channels(rgb, "RGB ")


def test_conversion_error_names_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((6, 4, 4), np.uint8), photometric="minisblack")
    with pytest.raises(ValueError, match="s.tif"):
        read_image(tmp_path / "s.tif", "rgb")
