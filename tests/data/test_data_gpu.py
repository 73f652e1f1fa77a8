"""`data.decoder=gpu`: the workers' plan and the device's batched decode, run here on CPU tensors (the
fallback path: libjpeg through torchvision), against the other decoders; the one-line error without CUDA."""

import warnings

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from openmae.cli import main
from openmae.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    ImageFolderDataset,
    UnreadableImageWarning,
    build_dataset,
    build_feed,
    pretrain_transform,
    read_image,
)
from openmae.data.decode import jpeg_pretrain_transform
from openmae.data.feed import MapFeed
from openmae.data.gpu import GpuDecodedFeed, GpuJpegDecoder, GpuJpegPlan, PendingJpeg
from openmae.data.sampler import seeded_rng
from openmae.data.turbo import TurboJpegPretrainTransform

ARGS = (224, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def save_photo(path, size, mode="RGB"):
    Image.fromarray(skimage.data.astronaut()).resize(size, Image.BICUBIC).convert(mode).save(path, quality=90)
    return path


@pytest.mark.parametrize("size", [(2000, 1500), (500, 333)])
def test_cpu_fallback_crops_match_the_reference_and_turbo_for_the_same_seeds(tmp_path, size):
    path = save_photo(tmp_path / "photo.jpg", size)
    plan = jpeg_pretrain_transform("gpu", *ARGS)
    assert isinstance(plan, GpuJpegPlan)
    seeds = (1, 2, 3)
    pending = plan.views(path, seeds)
    assert isinstance(pending, PendingJpeg) and pending.data.dtype == torch.uint8
    images, kept = GpuJpegDecoder(224, IMAGENET_MEAN, IMAGENET_STD, "cpu")([pending])
    assert images.shape == (3, 3, 224, 224) and kept.tolist() == [True] * 3
    gpu = images * STD + MEAN
    reference = pretrain_transform(*ARGS)  # full decode, float RandomResizedCrop, flip, normalise
    full = read_image(path, "rgb")
    turbo = TurboJpegPretrainTransform(*ARGS).views(path, seeds) * STD + MEAN
    for i, seed in enumerate(seeds):
        with seeded_rng(seed):
            exact = reference(full) * STD + MEAN
        assert (gpu[i] - exact).abs().mean() < 0.01  # the same crop, another libjpeg build
        assert (gpu[i] - turbo[i]).abs().mean() < 0.03  # the draft-mode tolerance
    assert (gpu[0] - gpu[1]).abs().mean() > 0.1  # the tolerances tell views apart


def test_a_gpu_feed_decodes_jpegs_in_the_training_process_and_skips_damaged_ones(tmp_path):
    root = tmp_path / "train"
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "d.jpg"]):
        (root / f"c{i}").mkdir(parents=True)
        save_photo(root / f"c{i}" / name, (120, 90), mode="L" if name == "c.jpg" else "RGB")  # c: gray
    damaged = root / "c3" / "d.jpg"
    damaged.write_bytes(damaged.read_bytes()[:800])  # the header reads, the pixels do not
    args = (32, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
    dataset = ImageFolderDataset(root, pretrain_transform(*args), "rgb", jpeg_transform=GpuJpegPlan(*args))
    decoder = GpuJpegDecoder(32, IMAGENET_MEAN, IMAGENET_STD, "cpu")
    # 2 images x 2 views a step and an epoch: the pass of epochs 0 and 1 reads the 4 images.
    feed = GpuDecodedFeed(MapFeed(dataset, batch_size=4, global_batch=4, views=2), decoder)
    assert isinstance(next(iter(feed.feed.batches(0, 0)))[0], list)  # the loader leaves JPEGs encoded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [batch for epoch in (0, 1) for batch in feed.batches(epoch, 0)]
    feed.close()
    images = torch.cat([b[0] for b in batches])
    labels, seeds = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
    assert images.shape == (6, 3, 32, 32) and sum(b[3] for b in batches) == 2  # the damaged image's 2 views
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2] and len(set(seeds.tolist())) == 6
    gray = images[labels == 2] * STD + MEAN  # a gray JPEG decoded to RGB: equal channels
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-5, rtol=0)
    assert [w for w in caught if w.category is UnreadableImageWarning and "d.jpg" in str(w.message)]
    # A CMYK JPEG, which libjpeg cannot decode to RGB here, goes through PIL.
    cmyk = save_photo(tmp_path / "cmyk.jpg", (120, 90), mode="CMYK")
    images, kept = decoder([GpuJpegPlan(*args).views(cmyk, (0,))])
    assert images.shape == (1, 3, 32, 32) and kept.all()


def test_decoder_gpu_without_cuda_is_one_line_exit_2(tmp_path, capsys):
    root = tmp_path / "train"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 50 * i, np.uint8)).save(root / f"{i}.jpg")
    args = ["pretrain", "model=mae_vit_debug", f"data.path={root}", "data.decoder=gpu", "device=cpu"]
    assert main([*args, "batch_size=2", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.decoder=gpu decodes JPEGs on a CUDA GPU" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    cfg = DataConfig(path=str(root), decoder="gpu")
    with pytest.raises(ValueError, match="decodes in the training feed: build it with build_feed"):
        build_dataset(cfg, "train", 32, 3)
    assert build_dataset(cfg, "train", 32, 3, raw=True) is not None  # untransformed images: no decoder
    with pytest.raises(ValueError, match="needs RGB input"):
        build_feed(DataConfig(path=str(root), decoder="gpu", channels="gray"), 32, 1, 2, device="cuda")
