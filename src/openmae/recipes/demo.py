"""`mae demo`: pretrain a small MAE on Fashion-MNIST on a CPU and show what it learned.

It trains with the shipped `demo.yaml`, then scores the masked-patch reconstruction error on held-out
test images against a trivial baseline (each hidden patch predicted as the mean of its image's
visible pixels), saves a reconstruction grid, and prints both numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Subset

from openmae.config import load_config
from openmae.configs import shipped_config
from openmae.data import build_dataset, build_loader, dataset_mean_std
from openmae.engine.evaluate import reconstruction_error
from openmae.recipes.pretrain import PretrainConfig, pretrain


def demo(overrides: Sequence[str] = (), test_images: int = 2000) -> dict:
    """Run the demo; `overrides` are `key=value` changes to the demo config. Returns the results."""
    cfg = load_config(PretrainConfig, shipped_config("demo"), overrides)
    started = time.perf_counter()
    result = pretrain(cfg)
    train_minutes = (time.perf_counter() - started) / 60

    from openmae import load_checkpoint, viz

    model = load_checkpoint(result.weights).eval()
    in_chans, img_size = model.config.in_chans, model.config.img_size
    test_set = build_dataset(cfg.data, "test", img_size, in_chans, train_transform=False)
    test_set = Subset(test_set, range(min(test_images, len(test_set))))
    loader = build_loader(test_set, batch_size=250, shuffle=False, num_workers=0)
    scores = reconstruction_error(model, loader, model.cls_token.device, seed=12345)
    mean, std = dataset_mean_std(cfg.data, in_chans)
    grid = viz.save_reconstruction_grid(
        model, next(iter(loader))[0][:8], Path(cfg.output_dir) / "reconstructions.png", mean, std, seed=0
    )
    results = {
        "test_images": len(test_set),
        "mask_ratio": model.config.mask_ratio,
        "masked_mse": scores["masked_mse"],
        "baseline_mse": scores["baseline_mse"],
        "ratio_to_baseline": scores["masked_mse"] / scores["baseline_mse"],
        "train_minutes": round(train_minutes, 2),
        "weights": str(result.weights),
        "reconstructions": str(grid),
    }
    (Path(cfg.output_dir) / "demo_results.json").write_text(json.dumps(results, indent=2))
    print_summary(results)
    return results


def print_summary(results: dict) -> None:
    print()
    print(
        f"Held-out masked-patch MSE on {results['test_images']} Fashion-MNIST test images "
        f"({results['mask_ratio']:.0%} of patches hidden, normalised pixel units):"
    )
    print(f"  MAE reconstruction               {results['masked_mse']:.4f}")
    print(f"  baseline: mean of visible pixels {results['baseline_mse']:.4f}")
    print(
        f"  MAE error is {results['ratio_to_baseline']:.1%} of the baseline's "
        f"after {results['train_minutes']:.1f} min of training"
    )
    print(f"Weights: {results['weights']}")
    print(f"Reconstructions: {results['reconstructions']}")
