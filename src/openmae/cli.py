"""The `mae` command: `mae pretrain | demo | visualize | plot | stats | shards | models | bench ...`.

Training commands take their whole configuration from a dataclass: the defaults, then `--config FILE`
(a path or a shipped config's name), then the command line, where each key is given once, as
`--key value` or as `key=value` (see `openmae.config`). Options match by their whole name only. Bad
input, an unknown option included, gives a one-line error and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from openmae.config.cli import CommandParser
from openmae.configs import list_shipped_configs, shipped_config
from openmae.errors import DivergedError, UsageError

# name -> (help, function taking argv and returning an exit code)
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}


def command(name: str, help: str):
    def register(fn: Callable[[list[str]], int]):
        COMMANDS[name] = (help, fn)
        return fn

    return register


def exit_code(stop_signal: str | None) -> int:
    """130 (128 + SIGINT, as shells report Ctrl-C) for a run the user stopped with Ctrl-C; 0 when it
    finished, or stopped on SIGTERM (a scheduler's pre-emption, after which the job is requeued)."""
    return 128 + signal.SIGINT if stop_signal == "SIGINT" else 0


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    return CommandParser(
        prog=f"mae {name}", description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


@command("pretrain", "pretrain a masked autoencoder (also under torchrun)")
def pretrain_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.recipes.pretrain import PretrainConfig, pretrain

    parser = _parser("pretrain", f"MAE pretraining. Shipped configs: {', '.join(list_shipped_configs())}.")
    cfg = parse_config_cli(PretrainConfig, argv, parser=parser, find_config=shipped_config)
    result = pretrain(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone speaks
        print(f"weights: {result.weights}")
    return exit_code(result.stop_signal)


@command("demo", "pretrain a small MAE on Fashion-MNIST on the CPU (~10 min) and score it")
def demo_command(argv: list[str]) -> int:
    from openmae.config.cli import reject_repeated_keys
    from openmae.recipes.demo import demo

    parser = _parser("demo", "Fashion-MNIST demo; overrides as key=value change the shipped demo.yaml.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the demo config")
    parser.add_argument("--test-images", type=int, default=2000, help="held-out test images to score")
    args = parser.parse_args(argv)
    reject_repeated_keys(args.overrides)
    demo(args.overrides, test_images=args.test_images)
    return 0


@command(
    "visualize", "write Figure-2 style reconstruction grids (original | masked | reconstruction | pasted)"
)
def visualize_command(argv: list[str]) -> int:
    from openmae.recipes.visualize import visualize

    parser = _parser("visualize", "Reconstruct images with a pretrained MAE and write a PNG grid.")
    parser.add_argument("images", nargs="*", help="image files or folders (default: dataset test images)")
    parser.add_argument("--checkpoint", required=True, help="MAE weights (openmae, reference .pth, HF)")
    parser.add_argument("--out", default="reconstructions.png", help="PNG file to write")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches hidden")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--num-images", type=int, default=8, help="rows (images) in the grid")
    parser.add_argument("--dataset", default=None, help="fashion_mnist | synthetic, when no images are given")
    parser.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalisation mean (default: dataset's)"
    )
    parser.add_argument(
        "--std", type=float, nargs="+", default=None, help="normalisation std (default: dataset's)"
    )
    args = parser.parse_args(argv)
    path = visualize(
        args.checkpoint,
        args.images,
        args.out,
        args.mask_ratio,
        args.seed,
        args.num_images,
        args.dataset,
        args.mean,
        args.std,
    )
    print(f"wrote {path}")
    return 0


@command("stats", "compute the per-channel mean and std of a dataset (for data.mean / data.std)")
def stats_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.data import DataConfig, build_dataset, compute_mean_std
    from openmae.recipes.runs import checked

    parser = _parser("stats", "Per-channel mean/std of a dataset's training images, in [0, 1] units.")
    parser.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    cfg = parse_config_cli(DataConfig, argv, parser=parser)
    namespace, _ = parser.parse_known_args(argv)
    in_chans = cfg.channels if isinstance(cfg.channels, int) else {"gray": 1, "rgb": 3}.get(cfg.channels, 3)
    if cfg.dataset == "fashion_mnist":
        in_chans = 1
    elif cfg.channels == "keep" and cfg.dataset in ("folder", "hf"):
        in_chans = None  # every image as stored
    with checked():
        dataset = build_dataset(cfg, "train", 224, in_chans, raw=True)
        mean, std = compute_mean_std(
            dataset, num_workers=cfg.resolved_num_workers(), max_images=namespace.max_images
        )
    print(
        "data.mean=["
        + ", ".join(f"{m:.4f}" for m in mean)
        + "] data.std=["
        + ", ".join(f"{s:.4f}" for s in std)
        + "]"
    )
    return 0


@command("shards", "write an image folder into webdataset tar shards with a manifest, for training")
def shards_command(argv: list[str]) -> int:
    from openmae.data.shards import parse_size, write_shards

    parser = _parser("shards", "Copy the images of a folder (flat or class sub-folders) into tar shards.")
    parser.add_argument("folder", help="the image folder")
    parser.add_argument("pattern", help="shard file names with a printf number, e.g. out/train-%%06d.tar")
    parser.add_argument("--shard-size", default="1GB", help="bytes of images per shard (1GB, 500MB, 64MiB)")
    parser.add_argument("--max-count", type=int, default=100_000, help="images per shard at most")
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep the sorted file order (default: a seeded shuffle)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already there")
    args = parser.parse_args(argv)
    stats = write_shards(
        args.folder,
        args.pattern,
        parse_size(args.shard_size),
        args.max_count,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    classes = f", {len(stats.classes)} classes" if stats.classes else ""
    print(f"wrote {stats.samples} images{classes} into {stats.shards} shards; manifest: {stats.manifest}")
    return 0


@command("plot", "draw the loss, lr and monitor curves of runs as one PNG, runs overlaid")
def plot_command(argv: list[str]) -> int:
    from openmae.plots import plot_runs

    parser = _parser(
        "plot", "Training loss and lr per logged step, monitor metrics per epoch, from each metrics.jsonl."
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


@command("models", "list the named model sizes")
def models_command(argv: list[str]) -> int:
    from openmae.models import list_models, model_config

    _parser("models", "Named model sizes for `model=` and openmae.create_model().").parse_args(argv)
    for name in list_models():
        c = model_config(name)
        print(
            f"{name:26s} img {c.img_size[0]}x{c.img_size[1]} patch {c.patch_size} in {c.in_chans}  "
            f"enc {c.embed_dim}x{c.depth} ({c.num_heads}h)  dec {c.decoder_embed_dim}x{c.decoder_depth} "
            f"({c.decoder_num_heads}h)"
        )
    return 0


@command("bench", "time pretraining steps against HuggingFace ViTMAE and the mask-tokens baseline")
def bench_command(argv: list[str]) -> int:
    from openmae import bench

    return bench.main(argv)


@command("linprobe", "train a linear probe on a frozen encoder (BatchNorm + linear head, LARS)")
def linprobe_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.recipes.linprobe import LinprobeConfig, linprobe

    parser = _parser("linprobe", "Linear probing; checkpoint=none model=NAME probes a random encoder.")
    result = linprobe(parse_config_cli(LinprobeConfig, argv, parser=parser, find_config=shipped_config))
    return exit_code(result.stop_signal)


@command("finetune", "fine-tune an encoder end to end, or its last blocks (trainable_blocks=k)")
def finetune_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.recipes.finetune import FinetuneConfig, finetune

    parser = _parser("finetune", "Fine-tuning; checkpoint=none model=NAME trains from scratch.")
    result = finetune(parse_config_cli(FinetuneConfig, argv, parser=parser, find_config=shipped_config))
    return exit_code(result.stop_signal)


@command("knn", "k-NN accuracy of an encoder's frozen features (k=20, cosine, T=0.07)")
def knn_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.distributed import is_main_process
    from openmae.recipes.knn import KnnConfig, knn

    parser = _parser("knn", "Weighted k-NN on frozen features.")
    metrics = knn(parse_config_cli(KnnConfig, argv, parser=parser))
    if is_main_process():  # under torchrun every rank has the result; one says it
        print(
            f"k-NN top-1 {metrics['knn_top1']:.2f}%, top-5 {metrics['knn_top5']:.2f}% "
            f"({metrics['query_images']} queries, {metrics['bank_images']} in the bank)"
        )
    return 0


@command(
    "ablate", "run ablation studies (the paper's Table 1, Figures 5, 6, 9): sweeps, seeds, tables, plots"
)
def ablate_command(argv: list[str]) -> int:
    from openmae.recipes.ablate import ablate
    from openmae.recipes.ablate_study import list_studies

    parser = _parser(
        "ablate", f"Run ablation studies (YAML files). Shipped studies: {', '.join(list_studies())}."
    )
    parser.add_argument("studies", nargs="+", metavar="STUDY", help="study YAML files or shipped study names")
    parser.add_argument("--out", default="runs/ablations", help="folder for the runs and the reports")
    parser.add_argument("--parallel", type=int, default=1, help="jobs at once, one process each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: split)")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="VARIANT", help="run these variants (globs)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="replace every variant's seeds")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
        help="config keys over the study's: mask_ratio=0.5, linprobe.epochs=10, data.path=DIR (every run's)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the jobs and whether they are done")
    args = parser.parse_args(argv)
    return ablate(
        args.studies,
        args.out,
        args.parallel,
        args.threads,
        args.only,
        args.overrides,
        args.seeds,
        args.dry_run,
    )


@command("eval", "top-1 / top-5 of a classifier checkpoint on labelled images")
def eval_command(argv: list[str]) -> int:
    from openmae.config import parse_config_cli
    from openmae.distributed import is_main_process
    from openmae.recipes.evaluate import EvalConfig, evaluate

    metrics = evaluate(parse_config_cli(EvalConfig, argv, parser=_parser("eval", "Score a classifier.")))
    if is_main_process():
        print(
            f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, loss {metrics['loss']:.4f} "
            f"on {metrics['images']} images"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv else None
    prog = f"mae {name}" if name in COMMANDS else "mae"
    try:
        if name not in COMMANDS:
            _top_parser().parse_args(argv[:1] or ["--help"])  # help, or an error naming the choices
            return 0
        return COMMANDS[name][1](argv[1:])
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except DivergedError as error:  # bad settings too, but found by training: exit 1, as a failed run
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a run's graceful stop, or a second one during it
        print(
            f"{prog}: interrupted; a run continues from its last checkpoint with resume=auto", file=sys.stderr
        )
        return 128 + signal.SIGINT


def _top_parser() -> argparse.ArgumentParser:
    top = CommandParser(prog="mae", description="Masked autoencoders for vision transformers.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return top


if __name__ == "__main__":
    sys.exit(main())
