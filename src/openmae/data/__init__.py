"""Data: image folders, Fashion-MNIST, synthetic images, transforms, mean/std, loaders.

Pretraining on JPEGs decodes at reduced size when the random crop allows (`jpeg`, with PIL;
`turbo`, with libjpeg-turbo), or on the GPU (`gpu`). Pretraining reads its data through
`build_feed`: map-style datasets through `feed.MapFeed`, streamed ones (`stream`: webdataset tar
shards from `shards`, HF datasets' files from `hf`) through `stream.StreamFeed`, with repeated
views (`data.views`) in both; the streaming modules load when used.

Every dataset yields `(image [C, H, W] float, label)`; folder datasets yield None for a file that
cannot be decoded, which `collate_skip` drops and counts in `Batch.num_skipped`.
"""

from openmae.data.build import (
    DATASETS,
    DataConfig,
    build_dataset,
    build_feed,
    dataset_mean_std,
    training_images,
)
from openmae.data.fashion_mnist import FashionMNIST, find_fashion_mnist, read_idx
from openmae.data.folder import ImageFolderDataset, UnreadableImageWarning, find_images, list_classes
from openmae.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    convert_channels,
    decode_image,
    read_image,
)
from openmae.data.jpeg import JpegPretrainTransform
from openmae.data.loader import Batch, build_loader, collate_skip, default_num_workers
from openmae.data.stats import RunningMoments, compute_mean_std
from openmae.data.synthetic import SyntheticImages
from openmae.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_mean_std,
    eval_transform,
    pretrain_transform,
)

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "Batch",
    "DataConfig",
    "FashionMNIST",
    "ImageFolderDataset",
    "JpegPretrainTransform",
    "RunningMoments",
    "SyntheticImages",
    "UnreadableImageError",
    "UnreadableImageWarning",
    "build_dataset",
    "build_feed",
    "training_images",
    "build_loader",
    "collate_skip",
    "compute_mean_std",
    "convert_channels",
    "dataset_mean_std",
    "decode_image",
    "default_mean_std",
    "default_num_workers",
    "eval_transform",
    "find_fashion_mnist",
    "find_images",
    "list_classes",
    "pretrain_transform",
    "read_idx",
    "read_image",
]
