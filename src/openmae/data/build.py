"""`DataConfig`, `build_dataset` and `build_feed`: from the data section of a run's config to the data.

Pretraining reads its training data through a `TrainFeed` from `build_feed`: map-style datasets
(folders, Fashion-MNIST, synthetic images, HF datasets) through a `MapFeed`, streamed ones
(webdataset shards, HF datasets with `streaming=true`) through a `StreamFeed`; with repeated
views and GPU decoding there too. Validation sets, and the other recipes' data, come from
`build_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from openmae.data.decode import DECODERS, ImageLoader, JpegTransform, Transform, jpeg_pretrain_transform
from openmae.data.fashion_mnist import FashionMNIST
from openmae.data.folder import ImageFolderDataset, has_class_folders, list_classes
from openmae.data.images import Channels
from openmae.data.loader import default_num_workers
from openmae.data.synthetic import SyntheticImages
from openmae.data.transforms import Size, default_mean_std, eval_transform, pretrain_transform
from openmae.data.wrappers import UserImages
from openmae.errors import UsageError

if TYPE_CHECKING:
    from openmae.data.feed import TrainFeed

DATASETS = ("folder", "fashion_mnist", "synthetic", "webdataset", "hf")
SPLITS = ("train", "val", "test")
IN_MEMORY = ("fashion_mnist", "synthetic")  # small images already at the model's size


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    dataset: str = field(
        default="folder", metadata={"help": "folder | fashion_mnist | synthetic | webdataset | hf"}
    )
    path: str | None = field(
        default=None,
        metadata={
            "help": "training image folder (class sub-folders or flat); Fashion-MNIST's IDX folder; "
            "webdataset: a shard manifest (.json, or its folder), a brace pattern "
            "(train-{000000..000146}.tar) or '::'-joined paths/URLs; hf: a saved dataset, a "
            "parquet folder or an image folder"
        },
    )
    val_path: str | None = field(
        default=None,
        metadata={"help": "validation image folder (hf: dataset folder; none: no validation)"},
    )
    channels: str | int | None = field(
        default=None, metadata={"help": "keep | rgb | gray | a channel count (none: the model's in_chans)"}
    )
    labels: str = field(
        default="auto",
        metadata={"help": "folder labels: auto | folders (first-level sub-folders) | none (-1)"},
    )
    mean: tuple[float, ...] | None = field(
        default=None, metadata={"help": "per-channel mean (none: the dataset's default; see `mae stats`)"}
    )
    std: tuple[float, ...] | None = field(default=None, metadata={"help": "per-channel std (none: default)"})
    crop_scale: tuple[float, float] = field(
        default=(0.2, 1.0), metadata={"help": "RandomResizedCrop area range for training"}
    )
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips for training"})
    random_crop: bool = field(
        default=True,
        metadata={"help": "random-resized crops for training (false: a resize; Table 1e 'none')"},
    )
    color_jitter: float = field(
        default=0.0, metadata={"help": "brightness / contrast / saturation jitter for training (0: off)"}
    )
    fast_decode: bool = field(
        default=True,
        metadata={
            "help": "training on JPEGs with RGB input: decode at reduced size when the random crop "
            "allows (see data.decoder); false: always decode at full size"
        },
    )
    decoder: str = field(
        default="auto",
        metadata={
            "help": "JPEG decoder of the fast path: pil (draft mode, 1/2-1/8) | turbo (libjpeg-turbo "
            "via simplejpeg, 1/2-1/8; the turbo extra) | auto (turbo when installed, else pil) | gpu "
            "(pretraining on CUDA: nvJPEG, batched, crops on the GPU; the workers only read files)"
        },
    )
    views: int = field(
        default=1,
        metadata={
            "help": "pretraining: augmented views per decoded image (repeated sampling); a micro-batch "
            "is batch_size / views images x views views, each view its own crop, flip and mask; an "
            "epoch stays batch-size independent in samples, so it reads 1/views of the images"
        },
    )
    manifest: str | None = field(
        default=None,
        metadata={"help": "webdataset: the shards' manifest, when it is not beside them (remote shards)"},
    )
    epoch_images: int | None = field(
        default=None,
        metadata={
            "help": "streamed datasets: training samples per epoch over all ranks (none: as many as "
            "images), rounded down to a multiple of the global batch"
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "streamed datasets: samples each loader worker shuffles among (after the shards)"},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "hf: read the parquet / saved Arrow files in order as shards instead of by index"},
    )
    split: str = field(default="train", metadata={"help": "hf: the split to train on"})
    val_split: str | None = field(
        default=None, metadata={"help": "hf: the split to validate on (none: no validation)"}
    )
    image_column: str = field(default="image", metadata={"help": "hf: the column of the images"})
    label_column: str = field(
        default="auto", metadata={"help": "hf: the column of the labels | auto ('label' if any) | none"}
    )
    eval_crop_pct: float = field(
        default=0.875, metadata={"help": "evaluation on folders: resize to img_size / this, then centre crop"}
    )
    num_workers: int | None = field(
        default=None,
        metadata={"help": "data-loading processes (none: 0 for in-memory data, else CPU cores - 1, 2 to 8)"},
    )
    synthetic_size: int = field(default=1024, metadata={"help": "number of synthetic images per split"})
    download: bool = field(
        default=False, metadata={"help": "let torchvision download Fashion-MNIST if not found"}
    )

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}; got {self.dataset!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.decoder not in DECODERS:
            raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        if self.epoch_images is not None and self.epoch_images < 1:
            raise ValueError(f"data.epoch_images must be at least 1, got {self.epoch_images}")
        if self.views < 1:
            raise ValueError(f"data.views must be at least 1, got {self.views}")
        if self.color_jitter < 0:
            raise ValueError(f"data.color_jitter must be >= 0, got {self.color_jitter}")

    @property
    def streamed(self) -> bool:
        """Trained on through `build_feed` (shards read in order) rather than a map-style dataset."""
        return self.dataset == "webdataset" or (self.dataset == "hf" and self.streaming)

    def resolved_num_workers(self) -> int:
        """`num_workers`, or a default when it is None: 0 for Fashion-MNIST and synthetic images,
        whose items cost about a millisecond (the main process alone fed 900+ augmented Fashion-MNIST
        images/s on 2 cores, far above training speed; 2 workers gave no measurable gain), else
        `default_num_workers()`."""
        if self.num_workers is not None:
            return self.num_workers
        return 0 if self.dataset in IN_MEMORY else default_num_workers()


def dataset_mean_std(cfg: DataConfig, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation constants in use: the configured ones, else the dataset's defaults."""
    default_mean, default_std = default_mean_std(cfg.dataset, in_chans)
    mean = tuple(cfg.mean) if cfg.mean is not None else default_mean
    std = tuple(cfg.std) if cfg.std is not None else default_std
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"data.mean / data.std have {len(mean)} / {len(std)} values for {in_chans} channels")
    return mean, std


def build_dataset(
    cfg: DataConfig,
    split: str = "train",
    img_size: Size = 224,
    in_chans: int | None = 3,
    train_transform: bool = True,
    raw: bool = False,
) -> Dataset | None:
    """The dataset of a split, with the training or evaluation transform (`raw`: none, images in [0, 1]).

    `in_chans` is the model's channel count, which every image is made to have (see
    `_resolve_channels`); None (with `raw`, for a folder or HF dataset) keeps what `data.channels` gives.

    Items are `(image [in_chans, *img_size], label)`, or None for an unreadable file. "val" and
    "test" are the same split: the `val_path` folder (None when it is not set), Fashion-MNIST's
    10k test images, or a second synthetic set (another seed).

    Raises:
        FileNotFoundError: the data path does not exist or holds no images.
        ValueError: inconsistent settings (e.g. channels that do not give `in_chans`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"data.dataset must be one of {', '.join(DATASETS)}; got {cfg.dataset!r}")
    if split == "train" and cfg.streamed:
        raise ValueError(f"data.dataset={cfg.dataset} is streamed in training: build it with build_feed")
    if split == "train" and train_transform and not raw and cfg.decoder == "gpu":
        raise ValueError("data.decoder=gpu decodes in the training feed: build it with build_feed")
    return _build_dataset(cfg, split, img_size, in_chans, train_transform, raw)


def _build_dataset(
    cfg: DataConfig, split: str, img_size: Size, in_chans: int, train_transform: bool, raw: bool
) -> Dataset | None:
    channels = _resolve_channels(cfg.channels, in_chans)
    transform = jpeg_transform = None
    if not raw:
        if train_transform:
            transform, jpeg_transform = _train_transforms(cfg, img_size, in_chans, channels)
        else:
            # Fashion-MNIST and synthetic images are already (about) the model's size: no crop.
            crop_pct = None if cfg.dataset in IN_MEMORY else cfg.eval_crop_pct
            transform = eval_transform(img_size, *dataset_mean_std(cfg, in_chans), crop_pct)
    if cfg.dataset == "fashion_mnist":
        # Gray images: one channel, or repeated to three for an RGB model (FashionMNIST checks which).
        fmnist_split = "train" if split == "train" else "test"
        return FashionMNIST(cfg.path, fmnist_split, transform, in_chans, download=cfg.download)
    if cfg.dataset == "synthetic":
        seed = 0 if split == "train" else 1
        return SyntheticImages(cfg.synthetic_size, img_size, in_chans, seed=seed, transform=transform)
    if cfg.dataset == "hf":
        return _build_hf(cfg, split, channels, transform, jpeg_transform)
    return _build_folder(cfg, split, channels, transform, jpeg_transform)


def training_images(cfg: DataConfig, img_size: Size, in_chans: int) -> Dataset | None:
    """The map-style training set `build_feed` reads (augmented; with `data.decoder=gpu` its JPEGs
    left to decode), or None for a streamed dataset."""
    if cfg.streamed:
        return None
    return _build_dataset(cfg, "train", img_size, in_chans, train_transform=True, raw=False)


def build_feed(
    cfg: DataConfig,
    img_size: Size,
    in_chans: int,
    batch_size: int,
    accum_iter: int = 1,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str = "cpu",
    dataset: Dataset | None = None,
) -> TrainFeed:
    """The pretraining feed: `cfg`'s training images (or `dataset`: a map-style set of augmented
    `(image, label)` items that replaces them, a user's own or a part of `cfg`'s), in micro-batches.

    Micro-batches of `batch_size` samples (`batch_size / cfg.views` images, `views` views each);
    the epoch is a multiple of batch_size x accum_iter x world_size samples; `seed` is the run
    seed; rank and world size default to torch.distributed's. Batches are pinned for, and with
    `data.decoder=gpu` decoded on, `device`. See `openmae.data.feed` and `openmae.data.stream`
    for the order and what a resume replays.

    Raises:
        UsageError: missing shards or dataset files, too few images for one global batch, a
            batch_size that is not a multiple of data.views, data.decoder=gpu without CUDA.
        MissingExtraError: webdataset / datasets / pyarrow not installed.
    """
    from openmae.data.feed import MapFeed
    from openmae.data.stream import rank_and_world

    device = torch.device(device)
    if batch_size % cfg.views:
        raise UsageError(
            f"batch_size={batch_size} is not a multiple of data.views={cfg.views}: a micro-batch is "
            "batch_size / views images x views views"
        )
    gpu = cfg.decoder == "gpu" and not isinstance(dataset, UserImages)  # a user's images come decoded
    if gpu and device.type != "cuda":
        raise UsageError(
            f"data.decoder=gpu decodes JPEGs on a CUDA GPU, and this run's device is {device}; "
            "use data.decoder=auto (turbo or pil, in the loader workers)"
        )
    rank, world_size = rank_and_world(rank, world_size)
    options = {"seed": seed, "rank": rank, "world_size": world_size, "views": cfg.views}
    options |= {"num_workers": cfg.resolved_num_workers(), "pin_memory": device.type == "cuda"}
    if not cfg.streamed:
        if dataset is None:
            dataset = training_images(cfg, img_size, in_chans)
        global_batch = batch_size * accum_iter * world_size
        if len(dataset) < global_batch:
            raise UsageError(f"{len(dataset)} training images do not fill a global batch of {global_batch}")
        feed = MapFeed(dataset, batch_size, global_batch, **options)
    else:
        feed = _stream_feed(cfg, img_size, in_chans, batch_size, accum_iter, options)
    if not gpu:
        return feed
    from openmae.data.gpu import GpuDecodedFeed, GpuJpegDecoder

    return GpuDecodedFeed(feed, GpuJpegDecoder(img_size, *dataset_mean_std(cfg, in_chans), device))


def _stream_feed(cfg: DataConfig, img_size: Size, in_chans: int, batch_size: int, accum_iter: int, options):
    from openmae.data.stream import DecodedItem, StreamFeed

    channels = _resolve_channels(cfg.channels, in_chans)
    transform, jpeg_transform = _train_transforms(cfg, img_size, in_chans, channels)
    if cfg.path is None:
        raise ValueError(f"data.path must name the data for data.dataset={cfg.dataset!r}")
    item = DecodedItem(ImageLoader(channels, transform, jpeg_transform))
    options = {**options, "batch_size": batch_size, "accum_iter": accum_iter}
    options |= {"shuffle_buffer": cfg.shuffle_buffer, "epoch_images": cfg.epoch_images}
    if cfg.dataset == "webdataset":
        from openmae.data.shards import WebDatasetFeed

        return WebDatasetFeed(cfg.path, item, cfg.manifest, **options)
    from openmae.data.hf import HFFileShards

    source = HFFileShards.open(cfg.path, cfg.split, cfg.image_column, cfg.label_column)
    return StreamFeed(source, item, **options)


def _train_transforms(
    cfg: DataConfig, img_size: Size, in_chans: int, channels: Channels
) -> tuple[Transform, JpegTransform | None]:
    """The pretraining transform, and the same augmentation fused with the JPEG decode of
    `decoder` (for RGB input with `fast_decode`: PIL, libjpeg-turbo or the GPU)."""
    mean, std = dataset_mean_std(cfg, in_chans)
    if cfg.color_jitter and in_chans not in (1, 3):
        raise ValueError(f"data.color_jitter works on 1 or 3 channels, not {in_chans}")
    transform = pretrain_transform(
        img_size, mean, std, cfg.crop_scale, cfg.hflip, cfg.random_crop, cfg.color_jitter
    )
    plain_crop = cfg.random_crop and not cfg.color_jitter  # what the fused JPEG decoders do
    if not (cfg.fast_decode and channels in ("rgb", 3) and plain_crop):
        if cfg.decoder == "gpu":
            raise ValueError("data.decoder=gpu needs RGB input, data.fast_decode=true and plain crops")
        return transform, None
    return transform, jpeg_pretrain_transform(cfg.decoder, img_size, mean, std, cfg.crop_scale, cfg.hflip)


def _build_hf(cfg: DataConfig, split: str, channels: Channels, transform, jpeg_transform) -> Dataset | None:
    from openmae.data.hf import HFImageDataset, load_hf_dataset

    if split == "train":
        path, hf_split = cfg.path, cfg.split
    elif cfg.val_split is None:
        return None
    else:
        path, hf_split = cfg.val_path or cfg.path, cfg.val_split
    if path is None:
        raise ValueError("data.path must name the dataset folder for data.dataset='hf'")
    dataset = load_hf_dataset(path, hf_split)
    return HFImageDataset(dataset, transform, channels, cfg.image_column, cfg.label_column, jpeg_transform)


def _build_folder(
    cfg: DataConfig, split: str, channels: Channels, transform, jpeg_transform
) -> Dataset | None:
    if split == "train":
        if cfg.path is None:
            raise ValueError("data.path must name the image folder for data.dataset='folder'")
        return ImageFolderDataset(cfg.path, transform, channels, cfg.labels, jpeg_transform=jpeg_transform)
    if cfg.val_path is None:
        return None
    classes = _training_classes(cfg)
    return ImageFolderDataset(cfg.val_path, transform, channels, cfg.labels, classes, jpeg_transform)


def _training_classes(cfg: DataConfig) -> list[str] | None:
    """The training folder's (or shards') class names, to index the validation classes by (so
    labels agree)."""
    if cfg.labels == "none" or cfg.path is None:
        return None
    if cfg.dataset == "webdataset":
        from openmae.data.shards import TarShards

        return TarShards.open(cfg.path, cfg.manifest).classes or None
    if not Path(cfg.path).is_dir():
        return None
    return list_classes(cfg.path) if has_class_folders(cfg.path) else None


def _resolve_channels(channels: Channels | None, in_chans: int | None) -> Channels:
    """The channel mode for the datasets, checked against the model's input channels.

    For a model (`in_chans` given), "keep" and None both mean its channel count: gray and RGB images
    are converted into it where that is well defined (gray <-> RGB, alpha dropped), and any other
    image is skipped and named like an unreadable file, instead of breaking a batch. Without a model
    (`mae stats`), "keep" leaves every image as stored.
    """
    if channels is None:
        return "keep" if in_chans is None else in_chans
    if isinstance(channels, str) and channels.isdigit():  # "4" from a command line
        channels = int(channels)
    if channels not in ("keep", "rgb", "gray") and not (type(channels) is int and channels > 0):
        raise ValueError(f"data.channels must be keep, rgb, gray or a channel count; got {channels!r}")
    if channels == "keep":
        return "keep" if in_chans is None else in_chans
    expected = {"rgb": 3, "gray": 1}.get(channels, channels)
    if in_chans is not None and expected != in_chans:
        raise ValueError(
            f"data.channels={channels!r} gives {expected} channels but the model takes {in_chans}"
        )
    return channels
