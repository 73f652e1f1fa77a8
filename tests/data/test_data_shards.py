"""`mae shards` and `WebDatasetFeed`: round trip, errors before writing, exactly-once split, replay."""

import collections
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.cli import main
from openmae.data import DataConfig, UnreadableImageWarning, build_dataset
from openmae.data.build import build_feed
from openmae.data.shards import TarShards, WebDatasetFeed, count_tar_samples, parse_size, write_shards


def class_folder(root, classes=24, per_class=1, size=(30, 40)):
    """`classes` sub-folders of `per_class` images; with one image per class the label is its id."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            name = f"img.{i}.jpg" if (c + i) % 2 else f"img{i}.png"  # a dot in the name: keys must not
            Image.fromarray(pixels).save(folder / name, quality=90)
    return root


def test_mae_shards_round_trips_count_classes_and_the_bytes_of_an_image(tmp_path, capsys):
    src = class_folder(tmp_path / "src", classes=3, per_class=5)
    code = main(["shards", str(src), str(tmp_path / "out" / "train-%04d.tar"), "--max-count", "4"])
    assert code == 0
    assert "wrote 15 images, 3 classes into 4 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["total"] == 15 and manifest["classes"] == ["c00", "c01", "c02"]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 4, 3]
    assert manifest["pattern"] == "train-{0000..0003}.tar"
    shards = TarShards.open(str(tmp_path / "out" / "train.json"))
    records = [r for shard in range(len(shards.names)) for r in shards.read(shard)]
    assert len(records) == 15 and collections.Counter(r.label for r in records) == {0: 5, 1: 5, 2: 5}
    by_key = {r.name.split(":")[1]: r for r in records}
    original = src / "c01" / "img.0.jpg"
    assert by_key["c01/img_0"].data == original.read_bytes() and by_key["c01/img_0"].label == 1
    # The same shards by brace pattern (manifest found beside them) and without any manifest.
    pattern = str(tmp_path / "out" / manifest["pattern"])
    assert TarShards.open(pattern).counts == [4, 4, 4, 3]
    (tmp_path / "out" / "train.json").unlink()
    assert TarShards.open(pattern).counts == [4, 4, 4, 3] == [count_tar_samples(n) for n in shards.names]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nope", "{tmp}/out/a-%03d.tar"], "image folder not found"),
        (["{tmp}/empty", "{tmp}/out/a-%03d.tar"], "no images"),
        (["{tmp}/src", "{tmp}/out/a.tar"], "needs one shard number"),
        (["{tmp}/src", "{tmp}/out/a-%03d.tar", "--shard-size", "big"], "bad size 'big'"),
        (["{tmp}/src", "{tmp}/old/a-%03d.tar"], "already exists; pass --overwrite"),
    ],
)
def test_mae_shards_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    class_folder(tmp_path / "src", classes=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "a-000.tar").write_bytes(b"")
    code = main(["shards", *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["a-000.tar"]


def test_overwrite_replaces_every_old_shard(tmp_path):
    src = class_folder(tmp_path / "src", classes=4)
    write_shards(src, str(tmp_path / "a-%02d.tar"), max_count=1, progress=False)
    stats = write_shards(src, str(tmp_path / "a-%02d.tar"), max_count=3, overwrite=True, progress=False)
    assert stats.shards == 2 and sorted(p.name for p in tmp_path.glob("a-*.tar")) == ["a-00.tar", "a-01.tar"]


def test_sizes_read_as_people_write_them():
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("64MiB") == 2**26
    assert parse_size("2e9") == 2 * 10**9 and parse_size("1.5G") == 1.5 * 10**9 and parse_size("100") == 100


def shard_config(tmp_path, classes=24, max_count=5, **options):
    src = class_folder(tmp_path / "src", classes)
    write_shards(src, str(tmp_path / "sh" / "train-%03d.tar"), max_count=max_count, progress=False)
    return DataConfig(dataset="webdataset", path=str(tmp_path / "sh"), **options)


def test_two_ranks_with_two_workers_read_every_key_exactly_once(tmp_path):
    cfg = shard_config(tmp_path, classes=24, num_workers=2, shuffle_buffer=3)
    labels = collections.Counter()
    for rank in range(2):
        feed = build_feed(cfg, 16, 3, batch_size=3, rank=rank, world_size=2, seed=1)
        assert isinstance(feed, WebDatasetFeed) and feed.epoch_images == 24
        batches = list(feed.batches(0, 0))
        feed.close()
        assert len(batches) == 4
        for images, batch_labels, _, skipped in batches:
            assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and skipped == 0
            labels.update(batch_labels.tolist())
    assert labels == collections.Counter(range(24))  # one image per class: the label is the key


def test_interrupted_reading_resumes_with_the_same_images_and_seeds(tmp_path):
    cfg = shard_config(tmp_path, classes=20, num_workers=2, shuffle_buffer=4)
    feed = build_feed(cfg, 16, 3, batch_size=2, seed=3)  # 10 steps of 2
    full = list(feed.batches(1, 0))
    stopped = feed.batches(1, 0)
    head = [next(stopped) for _ in range(3)]  # a run stopped after step 3 ...
    feed.close()
    rest = list(feed.batches(1, 6))  # ... and resumed at image 6
    feed.close()
    assert len(full) == 10 and len(rest) == 7
    for a, b in zip(full, head + rest, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_unreadable_images_in_shards_are_skipped_and_counted(tmp_path):
    src = class_folder(tmp_path / "src", classes=4)
    (src / "c00" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    write_shards(src, str(tmp_path / "sh" / "t-%02d.tar"), progress=False)
    cfg = DataConfig(dataset="webdataset", path=str(tmp_path / "sh" / "t.json"), num_workers=0)
    feed = build_feed(cfg, 16, 3, batch_size=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ((images, labels, seeds, skipped),) = list(feed.batches(0, 0))
    assert skipped == 1 and images.shape[0] == len(labels) == len(seeds) == 4
    assert any(w.category is UnreadableImageWarning and "broken" in str(w.message) for w in caught)


def test_a_damaged_shard_counts_its_missing_samples_as_skipped(tmp_path):
    cfg = shard_config(tmp_path, classes=8, max_count=4, num_workers=0)
    second = tmp_path / "sh" / "train-001.tar"
    second.write_bytes(second.read_bytes()[:1500])  # cut inside its first sample's image
    feed = build_feed(cfg, 16, 3, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(feed.batches(0, 0))
    assert len(batches) == 4 and sum(b[3] for b in batches) == 4 and sum(len(b[1]) for b in batches) == 4
    assert any("train-001.tar ended after 1 samples, 4 expected" in str(w.message) for w in caught)
    assert not [w for w in caught if w.category is ResourceWarning]  # shard files are closed


def test_shards_validate_on_a_folder_with_the_manifest_classes(tmp_path):
    cfg = shard_config(tmp_path, classes=3)
    val = tmp_path / "val" / "c02"
    val.mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(val / "x.png")
    cfg.val_path = str(tmp_path / "val")
    dataset = build_dataset(cfg, "val", 16, 3, train_transform=False)
    assert dataset.classes == ["c00", "c01", "c02"] and dataset[0][1] == 2
    with pytest.raises(ValueError, match="build_feed"):
        build_dataset(cfg, "train", 16, 3)
