"""Per-worker speed of the pretraining input pipeline on JPEG photos: PIL draft mode and libjpeg-turbo
against the reference (full decode, RandomResizedCrop 224 bicubic, flip, normalise).

    PYTHONPATH=src python benchmarks/bench_decoders.py [--out benchmarks/results/decoder_speed.md]

One process, one thread (a DataLoader worker's view). Photos are scikit-image's colour samples resized
to 2000 x 1500 and 500 x 375 and saved as JPEG (quality 90). Each pipeline reads the file and returns
the normalised `[3, 224, 224]` crop; the rate is the best of `--rounds` rounds, the rounds of the
pipelines interleaved, so that other load on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from openmae.data import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform, read_image
from openmae.data.jpeg import JpegPretrainTransform
from openmae.data.turbo import TurboJpegPretrainTransform
from openmae.extras import require

SIZES = ((2000, 1500), (500, 375))
TARGETS = {(2000, 1500): 4.0, (500, 375): 1.5}  # issue 17: turbo / reference, per worker


def write_photos(root: Path, size: tuple[int, int]) -> list[Path]:
    skimage_data = require("skimage").data
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = root / f"{name}_{size[0]}x{size[1]}.jpg"
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize(size, Image.BICUBIC).save(
            path, quality=90
        )
        paths.append(path)
    return paths


def pipelines(img_size: int = 224) -> dict:
    args = (img_size, IMAGENET_MEAN, IMAGENET_STD, (0.2, 1.0), True)
    reference = pretrain_transform(*args)
    return {
        "reference: PIL full decode + float RRC": lambda path: reference(read_image(path, "rgb")),
        "pil: draft-mode decode (decoder=pil)": JpegPretrainTransform(*args),
        "turbo: libjpeg-turbo (decoder=turbo)": TurboJpegPretrainTransform(*args),
    }


def rates(paths: list[Path], images: int, rounds: int) -> dict[str, float]:
    """Images/s of each pipeline: the best round of `images` calls each."""
    best: dict[str, float] = {}
    for fn in pipelines().values():
        fn(paths[0])  # warm-up
    for _ in range(rounds):
        for name, fn in pipelines().items():
            start = time.perf_counter()
            for i in range(images):
                fn(paths[i % len(paths)])
            best[name] = max(best.get(name, 0.0), images / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = [
        "| photo | pipeline | images/s per worker | ms / image | x reference |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            paths = write_photos(Path(tmp), size)
            measured = rates(paths, images=24 if size[0] > 1000 else 120, rounds=args.rounds)
            base = next(iter(measured.values()))
            for name, rate in measured.items():
                photo = f"{size[0]}x{size[1]}"
                lines.append(f"| {photo} | {name} | {rate:.0f} | {1000 / rate:.2f} | {rate / base:.2f} |")
    ratios = ", ".join(f"{w}x{h}: >= {t:g}x" for (w, h), t in TARGETS.items())
    text = "\n".join(lines) + f"\n\nTargets (turbo / reference, issue 17): {ratios}.\n"
    print(text)
    if args.out is not None:
        command = __doc__.splitlines()[3].strip()
        args.out.write_text(f"# JPEG decoders: per-worker rates\n\n`{command}`\n\n{text}")


if __name__ == "__main__":
    main()
