"""The fine-tuning augmentation: the paper's RandAugment policy runs on current Pillow."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from openmae.config import load_config
from openmae.recipes.finetune import FinetuneConfig, _posterize_at_least_one_bit, finetune_transform


def test_the_default_randaugment_never_asks_pillow_for_zero_posterize_bits():
    cfg = load_config(
        FinetuneConfig, overrides=["data.dataset=synthetic", "checkpoint=none", "model=mae_vit_debug"]
    )
    transform = finetune_transform(cfg, (32, 32), 3)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    image = torch.rand(3, 32, 32)
    for _ in range(3000):  # magnitude 10 (0 bits) comes up within a few hundred draws
        assert transform(image).shape == (3, 32, 32)


def test_posterize_keeps_one_bit_where_zero_was_asked():
    image = Image.fromarray(np.full((4, 4, 3), 200, np.uint8))
    with pytest.raises(ValueError):
        from PIL import ImageOps

        ImageOps.posterize(image, 0)  # what the unpatched policy asks for at magnitude 10
    kept = np.asarray(_posterize_at_least_one_bit(image, 0))
    assert (kept == 128).all()  # 200 keeps its top bit
