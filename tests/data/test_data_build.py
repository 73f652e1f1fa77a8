"""DataConfig, build_dataset for each dataset kind, build_loader, and the synthetic images."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from openmae import hardware
from openmae.data import (
    DataConfig,
    SyntheticImages,
    build_dataset,
    build_loader,
    dataset_mean_std,
    default_num_workers,
)
from openmae.data import fashion_mnist as fmnist_module


def save_image(path, channels=3, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, channels) if channels == 3 else size
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_config_fields_have_help_and_validate():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f"DataConfig.{f.name} has no help"
    with pytest.raises(ValueError, match="folder, fashion_mnist, synthetic"):
        DataConfig(dataset="imagenet")
    with pytest.raises(ValueError, match="crop_scale"):
        DataConfig(crop_scale=(0.8, 0.2))
    assert DataConfig(num_workers=0).resolved_num_workers() == 0
    assert DataConfig().resolved_num_workers() == default_num_workers()
    assert DataConfig(dataset="fashion_mnist").resolved_num_workers() == 0


@pytest.mark.parametrize(("cores", "workers"), [(1, 2), (2, 2), (4, 3), (64, 8)])
def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch, cores, workers):
    monkeypatch.setattr(hardware, "usable_cores", lambda: cores)
    assert default_num_workers() == workers


def test_folder_train_and_val_share_class_indices(tmp_path):
    save_image(tmp_path / "train" / "a" / "1.png")
    save_image(tmp_path / "train" / "b" / "2.png", channels=1)  # gray: made RGB for a 3-channel model
    save_image(tmp_path / "val" / "b" / "3.jpg")
    cfg = DataConfig(path=str(tmp_path / "train"), val_path=str(tmp_path / "val"))
    train = build_dataset(cfg, "train", img_size=16, in_chans=3, train_transform=True)
    val = build_dataset(cfg, "val", img_size=16, in_chans=3, train_transform=False)
    assert [label for _, label in train] == [0, 1] and [label for _, label in val] == [1]
    assert all(image.shape == (3, 16, 16) for image, _ in [*train, *val])
    raw = build_dataset(cfg, "train", img_size=16, in_chans=3, raw=True)
    assert raw[0][0].shape == (3, 40, 48) and 0 <= raw[0][0].min() and raw[0][0].max() <= 1


def test_folder_without_val_path_has_no_val_set(tmp_path):
    save_image(tmp_path / "x.png")
    assert build_dataset(DataConfig(path=str(tmp_path)), "val", 16, 3) is None


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="data.path"):
        build_dataset(DataConfig(), "train", 16, 3)
    with pytest.raises(FileNotFoundError, match="missing-dir"):
        build_dataset(DataConfig(path=str(tmp_path / "missing-dir")), "train", 16, 3)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset(DataConfig(path=str(tmp_path)), "train", 16, 3)
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(path=str(tmp_path)), "validation", 16, 3)


def test_channel_settings_are_checked_against_the_model(tmp_path):
    save_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="gives 3 channels but the model takes 1"):
        build_dataset(DataConfig(path=str(tmp_path), channels="rgb"), "train", 16, 1)
    with pytest.raises(ValueError, match="channel count"):
        build_dataset(DataConfig(path=str(tmp_path), channels="colour"), "train", 16, 3)
    gray = build_dataset(DataConfig(path=str(tmp_path), channels="gray"), "train", 16, 1)
    assert gray[0][0].shape == (1, 16, 16)
    assert build_dataset(DataConfig(path=str(tmp_path), channels="1"), "train", 16, 1)[0][0].shape[0] == 1


def test_mean_std_settings(tmp_path):
    fmnist = DataConfig(dataset="fashion_mnist")
    assert dataset_mean_std(fmnist, 1) == ((fmnist_module.MEAN,), (fmnist_module.STD,))
    assert dataset_mean_std(DataConfig(mean=(0.1, 0.2), std=(1.0, 2.0)), 2) == ((0.1, 0.2), (1.0, 2.0))
    with pytest.raises(ValueError, match="3 channels"):
        dataset_mean_std(DataConfig(mean=(0.1,)), 3)
    # The configured constants reach the images: the eval view is exactly (raw - mean) / std.
    cfg = DataConfig(dataset="synthetic", synthetic_size=4, mean=(0.25,), std=(0.5,))
    raw = build_dataset(cfg, "train", 8, 1, raw=True)[2][0]
    normalised = build_dataset(cfg, "train", 8, 1, train_transform=False)[2][0]
    torch.testing.assert_close(normalised, (raw - 0.25) / 0.5)


def test_fashion_mnist_splits_via_config(tmp_path):
    from test_data_fashion_mnist import write_tiny_fashion_mnist

    write_tiny_fashion_mnist(tmp_path)
    cfg = DataConfig(dataset="fashion_mnist", path=str(tmp_path))
    train = build_dataset(cfg, "train", 28, 1, train_transform=True)
    test = build_dataset(cfg, "val", 28, 3, train_transform=False)
    assert len(train) == 5 and len(test) == 3
    assert train[0][0].shape == (1, 28, 28) and test[0][0].shape == (3, 28, 28)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_dataset(cfg, "train", 28, 2)


def test_synthetic_images_are_deterministic_structured_and_any_shape():
    a, b = SyntheticImages(6, (12, 20), 5, seed=3), SyntheticImages(6, (12, 20), 5, seed=3)
    image, label = a[4]
    assert image.shape == (5, 12, 20) and label == 4 and 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(b[4][0], image)
    assert not torch.equal(SyntheticImages(6, (12, 20), 5, seed=4)[4][0], image)
    assert not torch.equal(a[3][0], image)
    # Structure, not noise: neighbouring pixels are far more alike than random pairs.
    neighbour_diff = (image[:, :, 1:] - image[:, :, :-1]).abs().mean()
    shuffled = image.flatten(1)[:, torch.randperm(240, generator=torch.Generator().manual_seed(0))]
    assert neighbour_diff < 0.5 * (image.flatten(1) - shuffled).abs().mean()
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_splits_differ():
    cfg = DataConfig(dataset="synthetic", synthetic_size=3)
    train = build_dataset(cfg, "train", 8, 3, raw=True)
    val = build_dataset(cfg, "val", 8, 3, raw=True)
    assert len(train) == len(val) == 3 and not torch.equal(train[0][0], val[0][0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_reproducible_from_its_seed(num_workers):
    cfg = DataConfig(dataset="synthetic", synthetic_size=8)
    dataset = build_dataset(cfg, "train", 8, 3, train_transform=True)  # random crops and flips

    def epoch(seed):
        torch.manual_seed(123)  # without workers, augmentation draws from the global RNG
        loader = build_loader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=seed)
        return torch.cat([batch.images for batch in loader])  # [8, 3, 8, 8]

    first = epoch(0)
    torch.testing.assert_close(epoch(0), first)
    assert not torch.equal(epoch(1), first)


def test_loader_options():
    dataset = SyntheticImages(10, 8, 1)
    loader = build_loader(dataset, batch_size=4, shuffle=False, num_workers=0, drop_last=True)
    assert [len(b.images) for b in loader] == [4, 4] and not loader.pin_memory
    batch = next(iter(loader))
    assert batch.labels.tolist() == [0, 1, 2, 3] and batch.num_skipped == 0
    sampler = torch.utils.data.SequentialSampler(range(3))
    loader = build_loader(dataset, 2, shuffle=True, sampler=sampler)  # the sampler overrides shuffle
    assert [b.labels.tolist() for b in loader] == [[0, 1], [2]]
