"""HuggingFace `datasets` from disk: map-style (`HFImageDataset`) or streamed from its files (`HFFileShards`).

`data.path` is a dataset saved with `save_to_disk` (a `Dataset` or a `DatasetDict`, read with
`load_from_disk`), a folder of parquet files, or an image folder (`imagefolder`). Nothing is
downloaded. Images are read from the image column undecoded (`Image(decode=False)`: the stored
bytes, or a file path) and decoded by openmae (`load_image`), so JPEGs take the same fused
decode + augmentation path as image folders and shards.

Streaming (`data.streaming=true`) reads the dataset's own files front to back as shards of a
`StreamFeed`, with the row counts their metadata gives: the parquet files of a parquet folder, or
the Arrow files of a saved dataset; neither is copied into a cache first.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from openmae import extras
from openmae.data.decode import JpegTransform, Transform, load_image, load_views
from openmae.data.folder import UnreadableImageWarning
from openmae.data.images import Channels, UnreadableImageError
from openmae.data.stream import Record
from openmae.errors import UsageError

_ROWS_PER_READ = 256  # parquet rows decoded (as Arrow, not as images) at a time when streaming


def load_hf_dataset(path: str | Path, split: str = "train"):
    """The `datasets.Dataset` of `split` under `path`: saved (`load_from_disk`), parquet or imagefolder.

    Raises:
        UsageError: no such folder, or no such split.
    """
    datasets = extras.require("datasets")
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"dataset folder not found: {path}")
    if _is_saved(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"{path} has no split {split!r}; its splits: {', '.join(loaded)}")
            return loaded[split]
        return loaded
    builder = "parquet" if any(path.rglob("*.parquet")) else "imagefolder"
    try:
        return datasets.load_dataset(builder, data_dir=str(path), split=split)
    except ValueError as error:  # e.g. an unknown split
        raise UsageError(f"{path}: {' '.join(str(error).split())}") from None


def _is_saved(path: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image and the label (None: unlabelled), and the class names."""

    image: str
    label: str | None
    classes: list[str]

    @classmethod
    def of(cls, features, image: str, label: str) -> Columns:
        """Check the columns against a dataset's features. `label`: a name, "auto" ("label" when
        there is one) or "none".

        Raises:
            UsageError: a column that is not there, or an image column that is not an Image.
        """
        datasets = extras.require("datasets")
        names = list(features)
        if image not in features:
            raise UsageError(f"no image column {image!r} (data.image_column); columns: {', '.join(names)}")
        if not isinstance(features[image], datasets.Image):
            raise UsageError(f"column {image!r} holds {type(features[image]).__name__}, not images")
        if label == "auto":
            label = "label" if "label" in features else "none"
        if label == "none":
            return cls(image, None, [])
        if label not in features:
            raise UsageError(f"no label column {label!r} (data.label_column); columns: {', '.join(names)}")
        feature = features[label]
        return cls(image, label, list(feature.names) if isinstance(feature, datasets.ClassLabel) else [])

    def record(self, row: dict, where: str) -> Record:
        """A row (image undecoded: `{"bytes", "path"}`) as a `Record`."""
        value = row[self.image] or {}
        data = value.get("bytes") or value.get("path")
        label = -1 if self.label is None or row[self.label] is None else int(row[self.label])
        return Record(data, value.get("path") or where, label)


class HFImageDataset(Dataset):
    """A `datasets.Dataset` as `(image [C, H, W] float, label)` items, or None for an unreadable image.

    Args:
        dataset: the HF dataset (e.g. from `load_hf_dataset`).
        transform: applied to the decoded float tensor.
        channels: "keep" | "rgb" | "gray" | an int count (see `convert_channels`).
        image_column, label_column: see `Columns.of`.
        jpeg_transform: decodes and transforms JPEG bytes in one step (see `load_image`).
    """

    def __init__(
        self,
        dataset,
        transform: Transform | None = None,
        channels: Channels = "keep",
        image_column: str = "image",
        label_column: str = "auto",
        jpeg_transform: JpegTransform | None = None,
    ) -> None:
        datasets = extras.require("datasets")
        self.columns = Columns.of(dataset.features, image_column, label_column)
        kept = [c for c in (self.columns.image, self.columns.label) if c is not None]
        self.dataset = dataset.select_columns(kept).cast_column(image_column, datasets.Image(decode=False))
        self.transform, self.channels, self.jpeg_transform = transform, channels, jpeg_transform
        self.classes = self.columns.classes
        self._warned: set[int] = set()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self._read(index, load_image)

    def views(self, index: int, seeds: Sequence[int]) -> tuple[torch.Tensor, int] | None:
        """`(views [k, C, H, W], label)`: the image decoded once, view i augmented under `seeds[i]`
        (`SeededDataset` calls it), or None for an unreadable image."""
        return self._read(index, functools.partial(load_views, seeds=seeds))

    def _read(self, index: int, load: Callable) -> tuple[torch.Tensor, int] | None:
        """`load(data, channels=, transform=, jpeg_transform=, name=)` of row `index` with its
        label, or None for an unreadable image."""
        record = self.columns.record(self.dataset[index], f"row {index}")
        try:
            if record.data is None:
                raise UnreadableImageError("no image in the row")
            image = load(
                record.data, channels=self.channels, transform=self.transform,
                jpeg_transform=self.jpeg_transform, name=record.name,
            )  # fmt: skip
        except UnreadableImageError as error:
            if index not in self._warned:  # once per row and worker, as for image folders
                self._warned.add(index)
                warnings.warn(f"skipping unreadable image {record.name}: {error}", UnreadableImageWarning, 3)
            return None
        return image, record.label


@dataclass(frozen=True)
class HFFileShards:
    """The files of a parquet folder or a saved dataset as a `ShardSource` (row counts from metadata)."""

    names: list[str]
    counts: list[int]
    columns: Columns

    @classmethod
    def open(cls, path: str | Path, split: str = "train", image: str = "image", label: str = "auto"):
        """Raises `UsageError` for an image folder (use data.dataset=folder, or `mae shards`)."""
        datasets = extras.require("datasets")
        path = Path(path)
        if not path.is_dir():
            raise UsageError(f"dataset folder not found: {path}")
        if _is_saved(path):
            dataset = load_hf_dataset(path, split)
            names = [f["filename"] for f in dataset.cache_files]  # its Arrow files, memory-mapped
            counts = [len(datasets.Dataset.from_file(n)) for n in names]
            return cls(names, counts, Columns.of(dataset.features, image, label))
        if not any(path.rglob("*.parquet")):
            raise UsageError(
                f"{path}: streaming reads parquet files or a saved dataset; for an image folder use "
                "data.dataset=folder, or write shards with `mae shards`"
            )
        # The split's files as `datasets` resolves them (by file and folder names: train-*, test/...).
        data_files = datasets.load_dataset_builder("parquet", data_dir=str(path)).config.data_files
        if split not in data_files:
            raise UsageError(f"{path} has no split {split!r}; its splits: {', '.join(map(str, data_files))}")
        split_files = [str(f) for f in data_files[split]]
        parquet = extras.require("pyarrow").parquet
        counts = [parquet.ParquetFile(f).metadata.num_rows for f in split_files]
        schema = parquet.ParquetFile(split_files[0]).schema_arrow
        return cls(split_files, counts, Columns.of(datasets.Features.from_arrow_schema(schema), image, label))

    def read(self, shard: int) -> Iterator[Record]:
        """The rows of one file in stored order, images undecoded."""
        name = self.names[shard]
        columns = [c for c in (self.columns.image, self.columns.label) if c is not None]
        if name.endswith(".parquet"):
            parquet = extras.require("pyarrow").parquet
            row = 0
            for batch in parquet.ParquetFile(name).iter_batches(_ROWS_PER_READ, columns=columns):
                for values in batch.to_pylist():
                    yield self.columns.record(values, f"{name}[{row}]")
                    row += 1
            return
        datasets = extras.require("datasets")
        table = datasets.Dataset.from_file(name).select_columns(columns)
        table = table.cast_column(self.columns.image, datasets.Image(decode=False))
        for row, values in enumerate(table):
            yield self.columns.record(values, f"{name}[{row}]")
