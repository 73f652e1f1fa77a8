"""Repeated views (`data.views=k`): k crops of one decode, each with its own seed; every image read once
per pass of k epochs; resume stays exact; bad batch sizes are one line."""

import collections
import json

import numpy as np
import pytest
import simplejpeg
import skimage.data
import torch
from PIL import Image
from test_data_stream import MemoryShards, fake_item, run_epoch

from openmae.cli import main
from openmae.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, JpegPretrainTransform, build_feed
from openmae.data import jpeg as jpeg_module
from openmae.data.feed import MapFeed
from openmae.data.sampler import SeededSampler, seeded_rng, view_seeds
from openmae.data.stream import StreamFeed
from openmae.data.turbo import TurboJpegPretrainTransform
from openmae.engine.tasks import PretrainTask

ARGS = (64, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
DECODERS = {"pil": JpegPretrainTransform, "turbo": TurboJpegPretrainTransform}


def photo_folder(root, count=6, size=(400, 300)):
    """`count` class sub-folders of one photo each (label = image id): JPEGs, and one PNG."""
    photo = Image.fromarray(skimage.data.astronaut()).resize(size, Image.BICUBIC)
    for i in range(count):
        (root / f"c{i}").mkdir(parents=True)
        shifted = Image.fromarray(np.roll(np.asarray(photo), 37 * i, axis=1))  # each image its own pixels
        shifted.save(root / f"c{i}" / ("x.png" if i == 0 else "x.jpg"), quality=90)
    return root


def unit(views):
    return views * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


@pytest.mark.parametrize("decoder", ["pil", "turbo"])
def test_views_are_cut_from_one_decode_at_the_scale_of_the_smallest_crop(tmp_path, decoder, monkeypatch):
    path = tmp_path / "photo.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((2000, 1500), Image.BICUBIC).save(path, quality=90)
    transform = DECODERS[decoder](224, *ARGS[1:])
    seeds = (11, 12, 13, 14)
    decoded = []  # the sizes decoded: one decode per image, whatever the views
    if decoder == "pil":
        real = jpeg_module.draft_decode
        spy = lambda image, crop, size: decoded.append(crop) or real(image, crop, size)  # noqa: E731
        monkeypatch.setattr(jpeg_module, "draft_decode", spy)
    else:
        real = simplejpeg.decode_jpeg
        monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: decoded.append(k) or real(*a, **k))
    views = transform.views(path, seeds)
    assert views.shape == (4, 3, 224, 224) and len(decoded) == 1
    boxes = [view.box for view in jpeg_module.draw_views(1500, 2000, seeds, (0.2, 1.0), True)]
    smallest = jpeg_module.smallest_box(boxes)
    if decoder == "pil":
        assert decoded == [smallest]
    else:  # decoded at the scale the smallest crop allows, so every crop keeps >= 224 pixels
        scale = 1500 / decoded[0]["min_height"]
        assert min(smallest) / scale >= 224 > min(smallest) / (2 * scale)
    # Each view is the one its seed gives alone (alone it may decode smaller: resampling detail).
    for view, seed in zip(views, seeds, strict=True):
        (alone,) = transform.views(path, (seed,))
        assert (unit(view) - unit(alone)).abs().mean() < 0.03
    different = [(unit(views[i]) - unit(views[j])).abs().mean() for i in range(4) for j in range(i)]
    assert min(different) > 0.05  # four distinct crops


def test_a_map_style_batch_holds_k_distinct_views_of_each_image_with_k_distinct_seeds(tmp_path):
    cfg = DataConfig(path=str(photo_folder(tmp_path / "train")), views=3, num_workers=0)
    feed = build_feed(cfg, 32, 3, batch_size=6, seed=4)
    assert isinstance(feed, MapFeed) and feed.epoch_images == 6  # 6 images: 6 samples an epoch, 2 images
    ((images, labels, seeds, skipped),) = list(feed.batches(0, 0))
    assert images.shape == (6, 3, 32, 32) and skipped == 0
    assert labels[0::3].tolist() == labels[1::3].tolist() == labels[2::3].tolist()  # rows 3i..3i+2: image i
    assert labels[0] != labels[3]
    assert seeds.tolist() == [s for position in range(2) for s in view_seeds(4, 0, position, 3)]
    assert len(set(seeds.tolist())) == 6
    for image in range(2):
        rows = images[3 * image : 3 * image + 3]
        assert all((rows[i] - rows[j]).abs().mean() > 0.05 for i in range(3) for j in range(i))
    # Masking is drawn per view, from its seed.
    noise = PretrainTask((4, 4), 0.75).masking(seeds, torch.device("cpu"))["noise"]  # [6, 16]
    assert all(not torch.equal(noise[i], noise[j]) for i in range(6) for j in range(i))


def test_the_png_path_makes_views_from_one_decode_too(tmp_path):
    cfg = DataConfig(path=str(photo_folder(tmp_path / "train", count=2)), views=2, num_workers=0)
    dataset = build_feed(cfg, 32, 3, batch_size=2).loader.dataset.dataset
    assert dataset.samples[0][0].suffix == ".png"
    views, label = dataset.views(0, (5, 6))
    assert views.shape == (2, 3, 32, 32) and label == 0
    with seeded_rng(6):
        assert torch.equal(dataset[0][0], views[1])  # view i is the transform under seed i


def test_every_image_is_read_once_per_pass_of_k_epochs_over_ranks(tmp_path):
    # Map-style: 24 images, 2 ranks x 4 samples (2 images x 2 views): an epoch is 24 samples, 12 images.
    seen = collections.Counter()
    for epoch in range(4):
        for rank in range(2):
            sampler = SeededSampler(24, global_batch=8, seed=2, rank=rank, world_size=2, views=2)
            sampler.set_epoch(epoch)
            seen.update((epoch // 2, index) for index, _ in sampler)
    assert sorted(seen) == [(p, i) for p in range(2) for i in range(24)] and set(seen.values()) == {1}
    # Streamed: 33 samples in shards, the same layout with 2 workers a rank.
    counts = [5, 9, 2, 7, 4, 6]
    by_pass = collections.defaultdict(collections.Counter)
    for epoch in range(4):
        for rank in range(2):
            feed = StreamFeed(
                MemoryShards(counts), fake_item, batch_size=4, seed=5, rank=rank, world_size=2,
                num_workers=2, shuffle_buffer=3, views=2,
            )  # fmt: skip
            assert feed.epoch_images == 32 and feed.batches_per_epoch == 4  # 16 images an epoch
            for _, labels, seeds, _ in run_epoch(feed, epoch):
                assert torch.equal(labels[0::2], labels[1::2]) and len(set(seeds.tolist())) == 4
                by_pass[epoch // 2].update(labels[0::2].tolist())
    for ids in by_pass.values():  # 32 of the 33 images, once each, over the two epochs of a pass
        assert sum(ids.values()) == 32 and set(ids.values()) == {1}


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_resuming_with_views_replays_the_rest_of_the_epoch_exactly(tmp_path, kind):
    if kind == "map":
        cfg = DataConfig(path=str(photo_folder(tmp_path / "train", count=12)), views=2, num_workers=2)
        feed = build_feed(cfg, 32, 3, batch_size=4, seed=3)  # 12 samples an epoch: 3 steps
    else:
        feed = StreamFeed(MemoryShards([7, 5, 9]), fake_item, batch_size=4, seed=3, num_workers=2, views=2)
    epoch = 3  # the second epoch of a pass
    full = run_epoch(feed, epoch)
    for step in range(1, len(full)):
        rest = run_epoch(feed, epoch, start=step * 4)
        assert len(rest) == len(full) - step
        for a, b in zip(full[step:], rest, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_a_batch_that_is_not_whole_images_of_views_is_one_line_exit_2(tmp_path, capsys):
    folder = photo_folder(tmp_path / "train", count=4)
    args = ["pretrain", "model=mae_vit_debug", f"data.path={folder}", "data.views=3", "batch_size=4"]
    assert main([*args, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch_size=4 is not a multiple of data.views=3" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="data.views must be at least 1"):
        DataConfig(views=0)


def test_pretraining_with_views_trains_at_the_lr_of_its_batch(tmp_path, capsys):
    folder = photo_folder(tmp_path / "train", count=8)
    args = ["pretrain", "model=mae_vit_debug", f"data.path={folder}", "data.num_workers=0", "vis_every=0"]
    args += ["batch_size=4", "epochs=2", "log_every=1", "device=cpu"]
    assert main([*args, "data.views=4", f"output_dir={tmp_path / 'views'}"]) == 0
    out = capsys.readouterr().out
    assert "sqrt(effective batch 4 / 4096)" in out, out  # lr scaled by the samples of a batch, views counted
    records = [json.loads(line) for line in (tmp_path / "views" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)  # 8 samples (2 images) an epoch
