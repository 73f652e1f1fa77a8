"""`DataConfig` and `build_dataset`: from the data section of a run's config to a Dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from openmae.data.fashion_mnist import FashionMNIST
from openmae.data.folder import ImageFolderDataset, has_class_folders, list_classes
from openmae.data.images import Channels
from openmae.data.jpeg import JpegPretrainTransform
from openmae.data.loader import default_num_workers
from openmae.data.synthetic import SyntheticImages
from openmae.data.transforms import Size, default_mean_std, eval_transform, pretrain_transform

DATASETS = ("folder", "fashion_mnist", "synthetic")
SPLITS = ("train", "val", "test")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    dataset: str = field(default="folder", metadata={"help": "folder | fashion_mnist | synthetic"})
    path: str | None = field(
        default=None,
        metadata={"help": "training image folder (class sub-folders or flat), or Fashion-MNIST's IDX folder"},
    )
    val_path: str | None = field(
        default=None, metadata={"help": "validation image folder (folder datasets; none: no validation)"}
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
            "help": "training on JPEG folders with RGB input: decode at 1/2-1/8 size when the random "
            "crop allows (PIL draft mode); false: always decode at full size"
        },
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
        if self.color_jitter < 0:
            raise ValueError(f"data.color_jitter must be >= 0, got {self.color_jitter}")

    def resolved_num_workers(self) -> int:
        """`num_workers`, or a default when it is None: 0 for Fashion-MNIST and synthetic images,
        whose items cost about a millisecond (the main process alone fed 900+ augmented Fashion-MNIST
        images/s on 2 cores, far above training speed; 2 workers gave no measurable gain), else
        `default_num_workers()`."""
        if self.num_workers is not None:
            return self.num_workers
        return 0 if self.dataset in ("fashion_mnist", "synthetic") else default_num_workers()


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
    in_chans: int = 3,
    train_transform: bool = True,
    raw: bool = False,
) -> Dataset | None:
    """The dataset of a split, with the training or evaluation transform (`raw`: none, images in [0, 1]).

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
    channels = _resolve_channels(cfg.channels, in_chans)
    transform = jpeg_transform = None
    if not raw:
        mean, std = dataset_mean_std(cfg, in_chans)
        if train_transform:
            if cfg.color_jitter and in_chans not in (1, 3):
                raise ValueError(f"data.color_jitter works on 1 or 3 channels, not {in_chans}")
            transform = pretrain_transform(
                img_size, mean, std, cfg.crop_scale, cfg.hflip, cfg.random_crop, cfg.color_jitter
            )
            plain_crop = cfg.random_crop and not cfg.color_jitter  # what the fused JPEG decode does
            if cfg.fast_decode and channels in ("rgb", 3) and plain_crop:
                # The same augmentation, drawn while decoding JPEGs at reduced size.
                jpeg_transform = JpegPretrainTransform(img_size, mean, std, cfg.crop_scale, cfg.hflip)
        else:
            # Fashion-MNIST and synthetic images are already (about) the model's size: no crop.
            crop_pct = cfg.eval_crop_pct if cfg.dataset == "folder" else None
            transform = eval_transform(img_size, mean, std, crop_pct)
    if cfg.dataset == "fashion_mnist":
        # Gray images: one channel, or repeated to three for an RGB model (FashionMNIST checks which).
        fmnist_split = "train" if split == "train" else "test"
        return FashionMNIST(cfg.path, fmnist_split, transform, in_chans, download=cfg.download)
    if cfg.dataset == "synthetic":
        seed = 0 if split == "train" else 1
        return SyntheticImages(cfg.synthetic_size, img_size, in_chans, seed=seed, transform=transform)
    return _build_folder(cfg, split, channels, transform, jpeg_transform)


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
    """The training folder's class names, to index the validation classes by (so labels agree)."""
    if cfg.labels == "none" or cfg.path is None or not Path(cfg.path).is_dir():
        return None
    return list_classes(cfg.path) if has_class_folders(cfg.path) else None


def _resolve_channels(channels: Channels | None, in_chans: int) -> Channels:
    """The channel mode for the datasets, checked against the model's input channels."""
    if channels is None:
        return in_chans
    if isinstance(channels, str) and channels.isdigit():  # "4" from a command line
        channels = int(channels)
    if channels not in ("keep", "rgb", "gray") and not (type(channels) is int and channels > 0):
        raise ValueError(f"data.channels must be keep, rgb, gray or a channel count; got {channels!r}")
    expected = {"rgb": 3, "gray": 1}.get(channels, channels)
    if channels != "keep" and expected != in_chans:
        raise ValueError(
            f"data.channels={channels!r} gives {expected} channels but the model takes {in_chans}"
        )
    return channels
