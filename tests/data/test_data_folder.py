"""Image folders: discovery, labels, channels, and skipping unreadable files through a DataLoader."""

import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.data import (
    ImageFolderDataset,
    UnreadableImageWarning,
    build_loader,
    collate_skip,
    find_images,
    pretrain_transform,
)


def save_rgb(path, size=(10, 12), value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        array = np.random.default_rng(zlib.crc32(path.name.encode())).integers(
            0, 256, (*size, 3), dtype=np.uint8
        )
    else:
        array = np.full((*size, 3), value, np.uint8)
    Image.fromarray(array).save(path)


def make_class_tree(root):
    """cats: 2 images (one nested two levels down), dogs: 1 image, plus files that must be ignored."""
    save_rgb(root / "cats" / "a.jpg")
    save_rgb(root / "cats" / "deep" / "er" / "b.PNG")
    save_rgb(root / "dogs" / "c.webp")
    save_rgb(root / "dogs" / ".hidden.png")
    save_rgb(root / ".ipynb_checkpoints" / "d.png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def make_damaged_folder(root):
    """4 good images and 3 unreadable ones (truncated, zero bytes, text named .jpg)."""
    for i in range(4):
        save_rgb(root / f"good{i}.png", value=40 * i)
    save_rgb(root / "full.jpg", size=(64, 64))
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:200])
    (root / "full.jpg").unlink()
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    return root


def test_find_images_any_nesting_skips_hidden_and_other_files(tmp_path):
    make_class_tree(tmp_path)
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["cats/a.jpg", "cats/deep/er/b.PNG", "dogs/c.webp"]


def test_class_folders_give_sorted_labels(tmp_path):
    dataset = ImageFolderDataset(make_class_tree(tmp_path))
    assert dataset.classes == ["cats", "dogs"] and dataset.num_classes == 2
    assert dataset.targets == [0, 0, 1]
    image, label = dataset[2]
    assert image.shape == (3, 10, 12) and label == 1


def test_flat_folder_is_unlabelled_and_searched_recursively(tmp_path):
    save_rgb(tmp_path / "x.png")
    save_rgb(tmp_path / "sub" / "y.png")
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 2 and dataset.targets == [-1, -1] and dataset.num_classes == 0


def test_labels_none_ignores_class_folders(tmp_path):
    dataset = ImageFolderDataset(make_class_tree(tmp_path), labels="none")
    assert dataset.targets == [-1, -1, -1]


def test_given_classes_align_labels_across_splits(tmp_path):
    save_rgb(tmp_path / "val" / "dogs" / "c.png")
    dataset = ImageFolderDataset(tmp_path / "val", classes=["cats", "dogs"])
    assert dataset.targets == [1]
    with pytest.raises(ValueError, match="'dogs' is not among the classes"):
        ImageFolderDataset(tmp_path / "val", classes=["cats"])


def test_channel_modes_on_mixed_folder(tmp_path):
    save_rgb(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "gray.png")
    assert [x.shape[0] for x, _ in ImageFolderDataset(tmp_path)] == [1, 3]
    assert [x.shape[0] for x, _ in ImageFolderDataset(tmp_path, channels="rgb")] == [3, 3]
    assert [x.shape[0] for x, _ in ImageFolderDataset(tmp_path, channels=1)] == [1, 1]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    save_rgb(tmp_path / "flat" / "x.png")
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        ImageFolderDataset(tmp_path / "flat", labels="folders")


def test_unreadable_files_return_none_and_warn_once(tmp_path):
    dataset = ImageFolderDataset(make_damaged_folder(tmp_path))
    assert len(dataset) == 7
    names = [path.name for path, _ in dataset.samples]
    bad = names.index("truncated.jpg")
    with pytest.warns(UnreadableImageWarning, match="truncated.jpg"):
        assert dataset[bad] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read must not warn again
        assert dataset[bad] is None
    with pytest.warns(UnreadableImageWarning) as caught:
        readable = [item for item in dataset if item is not None]
    assert len(readable) == 4
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught) == ["empty.png", "text.jpg"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_drops_and_counts_unreadable_files(tmp_path, num_workers):
    transform = pretrain_transform(8, (0.5,) * 3, (0.5,) * 3)
    dataset = ImageFolderDataset(make_damaged_folder(tmp_path), transform, channels="rgb")
    loader = build_loader(dataset, batch_size=3, shuffle=True, num_workers=num_workers, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        for _ in range(2):  # persistent workers: the count holds on every epoch
            batches = list(loader)
            assert sum(b.num_skipped for b in batches) == 3
            assert sum(len(b.images) for b in batches) == 4
            for images, labels, _ in batches:
                assert images.shape[1:] == (3, 8, 8) or len(images) == 0
                assert images.dtype == torch.float32 and (labels == -1).all()


def test_collate_of_only_unreadable_items_is_an_empty_batch():
    batch = collate_skip([None, None])
    assert batch.images.numel() == 0 and len(batch.labels) == 0 and batch.num_skipped == 2
    batch = collate_skip([(torch.zeros(1, 2, 2), 3), None])
    assert batch.images.shape == (1, 1, 2, 2) and batch.labels.tolist() == [3] and batch.num_skipped == 1


def test_gif_files_are_images_read_as_their_first_frame(tmp_path):
    from openmae.data import read_image

    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    dataset = ImageFolderDataset(tmp_path, channels="rgb")
    assert [p.name for p, _ in dataset.samples] == ["anim.gif"]
    image = read_image(tmp_path / "anim.gif", "rgb")  # [3, 8, 8]
    assert image.shape == (3, 8, 8) and image[0].min() > 0.9 and image[2].max() < 0.1  # the red frame
