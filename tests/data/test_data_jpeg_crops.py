"""Reduced-size JPEG decoding for the random crop: close to the full decode, and the views asked for."""

import numpy as np
import pytest
from PIL import Image

from openmae.data import IMAGENET_MEAN, IMAGENET_STD, JpegPretrainTransform
from openmae.data.jpeg import decode_crops, draw_views


@pytest.fixture
def photo(tmp_path):
    """A smooth 640 x 480 colour JPEG (smooth, so that resampling differences stay small)."""
    y, x = np.mgrid[0:480, 0:640] / 100.0
    rgb = np.stack([np.sin(x), np.cos(y), np.sin(x + y)], axis=-1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(path, quality=95)
    return path


def test_draft_decode_matches_full_decode(photo):
    boxes = [(10, 20, 460, 600), (0, 0, 480, 480)]  # large crops: the decoder may halve the image
    draft = decode_crops(photo, boxes, 112, draft=True)
    full = decode_crops(photo, boxes, 112, draft=False)
    for d, f in zip(draft, full, strict=True):
        assert d.size == f.size == (112, 112)
        diff = np.abs(np.asarray(d, dtype=np.float32) - np.asarray(f, dtype=np.float32))
        assert diff.mean() < 2.0  # out of 255


def test_views_are_the_ones_asked_for_with_boxes_inside_the_image(photo):
    views = JpegPretrainTransform(64, IMAGENET_MEAN, IMAGENET_STD).views(photo, seeds=(1, 2, 3))
    assert views.shape == (3, 3, 64, 64)
    for top, left, h, w in (view.box for view in draw_views(480, 640, range(20), (0.2, 1.0), True)):
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        assert 0.2 * 480 * 640 * 0.99 <= h * w
