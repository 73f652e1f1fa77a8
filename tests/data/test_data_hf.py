"""`data.dataset=hf`: datasets made and saved in the test, read map-style and streamed; nothing downloaded."""

import collections
import io
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from openmae.cli import main
from openmae.data import DataConfig, UnreadableImageWarning, build_dataset
from openmae.data.build import build_feed
from openmae.data.turbo import TurboJpegPretrainTransform
from openmae.errors import UsageError


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """No network, and the `datasets` cache (parquet / imagefolder builds) inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def encoded(pixels, fmt):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, quality=90)
    return {"bytes": buffer.getvalue(), "path": None}


def tiny_dataset(count=12, classes=("cat", "dog", "owl"), label_name="label"):
    """RGB JPEGs and PNGs of 24 x 32 pixels, labelled i mod 3; the label column is a ClassLabel."""
    rng = np.random.default_rng(0)
    images = [
        encoded(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), "JPEG" if i % 2 else "PNG")
        for i in range(count)
    ]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            label_name: datasets.ClassLabel(names=list(classes)),
            "id": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, label_name: [i % len(classes) for i in range(count)], "id": list(range(count))},
        features=features,
    )


def test_a_saved_dataset_trains_map_style_with_labels_classes_and_the_fast_jpeg_path(tmp_path):
    tiny_dataset().save_to_disk(tmp_path / "saved")
    dataset = build_dataset(
        DataConfig(dataset="hf", path=str(tmp_path / "saved"), decoder="turbo"), "train", 16, 3
    )
    assert len(dataset) == 12 and dataset.classes == ["cat", "dog", "owl"] and dataset.num_classes == 3
    assert isinstance(dataset.jpeg_transform, TurboJpegPretrainTransform)
    items = [dataset[i] for i in range(12)]
    assert [label for _, label in items] == [i % 3 for i in range(12)]
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.float32 for image, _ in items)
    raw = build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "saved")), "train", 16, 3, raw=True)
    assert raw[0][0].shape == (3, 24, 32) and 0 <= raw[0][0].min() and raw[0][0].max() <= 1


def test_splits_columns_and_unlabelled_data_by_option(tmp_path):
    data = datasets.DatasetDict(
        {"train": tiny_dataset(6, label_name="kind"), "validation": tiny_dataset(3, label_name="kind")}
    )
    data.save_to_disk(tmp_path / "dict")
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "dict"), label_column="kind", val_split="validation")
    assert len(build_dataset(cfg, "train", 16, 3)) == 6
    val = build_dataset(cfg, "val", 16, 3, train_transform=False)
    assert len(val) == 3 and [val[i][1] for i in range(3)] == [0, 1, 2]
    unlabelled = build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "dict")), "train", 16, 3)
    assert unlabelled[0][1] == -1 and unlabelled.num_classes == 0  # no 'label' column: auto is none
    assert build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "dict")), "val", 16, 3) is None
    with pytest.raises(UsageError, match="no split 'test'; its splits: train, validation"):
        build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "dict"), split="test"), "train", 16, 3)
    with pytest.raises(UsageError, match="no image column 'img'.*columns: image, kind, id"):
        build_dataset(
            DataConfig(dataset="hf", path=str(tmp_path / "dict"), image_column="img"), "train", 16, 3
        )
    with pytest.raises(UsageError, match="column 'id' holds Value, not images"):
        build_dataset(
            DataConfig(dataset="hf", path=str(tmp_path / "dict"), image_column="id"), "train", 16, 3
        )


def test_unreadable_rows_are_skipped_with_a_warning(tmp_path):
    data = tiny_dataset(3).cast_column("image", datasets.Image(decode=False))
    rows = data.to_dict()
    rows["image"][1] = {"bytes": b"\xff\xd8\xff broken", "path": None}
    datasets.Dataset.from_dict(rows, features=data.features).save_to_disk(tmp_path / "saved")
    dataset = build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "saved")), "train", 16, 3)
    with pytest.warns(UnreadableImageWarning, match="row 1"):
        assert dataset[1] is None
    assert dataset[0] is not None and dataset[2] is not None


def test_parquet_and_image_folders_load_map_style(tmp_path):
    tiny_dataset().to_parquet(tmp_path / "pq" / "train-00000.parquet")
    parquet = build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "pq")), "train", 16, 3)
    assert len(parquet) == 12 and parquet.classes == ["cat", "dog", "owl"] and parquet[4][1] == 1
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), "red").save(tmp_path / "folder" / name / "x.png")
    folder = build_dataset(DataConfig(dataset="hf", path=str(tmp_path / "folder")), "train", 16, 3)
    assert (
        len(folder) == 2 and folder.classes == ["a", "b"] and sorted(folder[i][1] for i in range(2)) == [0, 1]
    )


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_streaming_reads_every_row_once_across_ranks_and_workers(tmp_path, kind):
    data = tiny_dataset(20)
    if kind == "parquet":
        for i in range(3):  # three files of 7, 7 and 6 rows
            data.select(range(7 * i, min(7 * i + 7, 20))).to_parquet(
                tmp_path / "data" / f"train-{i:05d}.parquet"
            )
    else:
        data.save_to_disk(tmp_path / "data", num_shards=3)
    cfg = DataConfig(
        dataset="hf", path=str(tmp_path / "data"), streaming=True, num_workers=2, label_column="id"
    )
    assert cfg.streamed
    seen = collections.Counter()
    for rank in range(2):
        feed = build_feed(cfg, 16, 3, batch_size=2, rank=rank, world_size=2)
        assert feed.source.counts == [7, 7, 6] and feed.epoch_images == 20
        for images, labels, _, skipped in feed.batches(0, 0):
            assert images.shape == (2, 3, 16, 16) and skipped == 0
            seen.update(labels.tolist())
        feed.close()
    assert seen == collections.Counter(range(20))
    with pytest.raises(ValueError, match="build_feed"):
        build_dataset(cfg, "train", 16, 3)


def test_streaming_an_image_folder_says_what_to_use_instead(tmp_path):
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "x.png")
    cfg = DataConfig(dataset="hf", path=str(tmp_path / "folder"), streaming=True)
    with pytest.raises(UsageError, match="data.dataset=folder, or write shards with `mae shards`"):
        build_feed(cfg, 16, 3, batch_size=1)


def test_pretraining_runs_a_few_steps_on_a_dataset_saved_to_disk(tmp_path):
    tiny_dataset(16).save_to_disk(tmp_path / "saved")
    out = tmp_path / "run"
    args = ["model=mae_vit_debug", "data.num_workers=0", "batch_size=4", "epochs=1", "vis_every=0"]
    code = main(
        ["pretrain", *args, "data.dataset=hf", f"data.path={tmp_path / 'saved'}", f"output_dir={out}"]
    )
    assert code == 0 and (out / "model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "skipped_images" in r]
    assert epoch and epoch[-1]["skipped_images"] == 0 and np.isfinite(epoch[-1]["train_loss"])
