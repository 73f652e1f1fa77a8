"""Pretraining and evaluation transforms on float tensors with any channel count; default mean/std."""

import pytest
import torch

from openmae.data import IMAGENET_MEAN, IMAGENET_STD, default_mean_std, eval_transform, pretrain_transform
from openmae.data import fashion_mnist as fmnist_module


@pytest.mark.parametrize("channels", [1, 3, 6])
def test_pretrain_transform_shape_dtype_and_determinism(channels):
    image = torch.rand(channels, 40, 50)
    transform = pretrain_transform(16, (0.5,) * channels, (0.25,) * channels)
    torch.manual_seed(0)
    out = transform(image)
    assert out.shape == (channels, 16, 16) and out.dtype == torch.float32
    torch.manual_seed(0)
    torch.testing.assert_close(transform(image), out)  # randomness comes from torch's RNG only


def test_pretrain_transform_normalises():
    # A constant image stays constant under crop/resize/flip, so the output is exactly (v - mean) / std.
    image = torch.full((3, 30, 30), 0.6)
    out = pretrain_transform(8, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))(image)
    expected = torch.tensor([(0.6 - 0.1) / 0.5, (0.6 - 0.2) / 0.25, (0.6 - 0.3) / 0.125])
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 8, 8))


def test_pretrain_crops_vary():
    image = torch.rand(1, 32, 32)
    transform = pretrain_transform(16, (0.0,), (1.0,))
    outs = [transform(image) for _ in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_full_scale_crop_keeps_the_image_and_flips_half_the_time():
    # With scale (1, 1) every aspect ratio but 1 overflows a square image, so torchvision falls back
    # to the whole image: what is left is the flip.
    image = torch.rand(1, 12, 12)
    torch.manual_seed(0)
    no_flip = pretrain_transform(12, (0.0,), (1.0,), crop_scale=(1.0, 1.0), hflip=False)
    assert all(torch.equal(no_flip(image), image) for _ in range(5))
    flip = pretrain_transform(12, (0.0,), (1.0,), crop_scale=(1.0, 1.0), hflip=True)
    flipped = [torch.equal(out, image.flip(-1)) for out in (flip(image) for _ in range(40))]
    assert 5 < sum(flipped) < 35


def test_eval_transform_resize_then_centre_crop():
    # 224 / 0.875 = 256: a 512x640 image goes to 256x320 and the central 224x224 is kept.
    image = torch.rand(3, 512, 640)
    out = eval_transform(224, (0.0,) * 3, (1.0,) * 3)(image)
    assert out.shape == (3, 224, 224)
    # Deterministic, and the centre of the image: compare with a direct resize + slice.
    resized = torch.nn.functional.interpolate(image[None], (256, 320), mode="bicubic", antialias=True)[0]
    torch.testing.assert_close(out, resized[:, 16:240, 48:272], atol=1e-4, rtol=0)


def test_eval_plain_resize_is_identity_at_native_size():
    image = torch.rand(1, 28, 28)
    out = eval_transform(28, (0.25,), (0.5,), crop_pct=None)(image)
    torch.testing.assert_close(out, (image - 0.25) / 0.5)
    assert eval_transform(32, (0.0,), (1.0,), crop_pct=None)(image).shape == (1, 32, 32)


def test_rectangular_sizes():
    image = torch.rand(2, 60, 90)
    assert pretrain_transform((16, 24), (0.5,) * 2, (0.5,) * 2)(image).shape == (2, 16, 24)
    assert eval_transform((16, 24), (0.5,) * 2, (0.5,) * 2)(image).shape == (2, 16, 24)


def test_default_mean_std():
    assert default_mean_std("folder", 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert IMAGENET_MEAN == pytest.approx((0.485, 0.456, 0.406))
    assert default_mean_std("fashion_mnist", 1) == ((fmnist_module.MEAN,), (fmnist_module.STD,))
    assert default_mean_std("fashion_mnist", 3)[0] == (fmnist_module.MEAN,) * 3
    assert default_mean_std("folder", 6) == ((0.5,) * 6, (0.5,) * 6)
    assert default_mean_std("synthetic", 1) == ((0.5,), (0.5,))
