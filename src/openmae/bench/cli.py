"""`mae bench` / `benchmarks/bench_pretrain.py`: argument parsing around `run_benchmark`."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from openmae.bench.engines import DEFAULT_PEERS, ENGINES, engine_spec
from openmae.bench.report import write_results
from openmae.bench.run import BENCH_PRECISIONS, BenchOptions, custom_config, log, named_configs, run_benchmark
from openmae.config.cli import CommandParser
from openmae.distributed import resolve_device
from openmae.errors import UsageError
from openmae.extras import require


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="mae bench",
        description="Time MAE pretraining steps (forward, backward, optimizer) against HuggingFace ViTMAE "
        "and the mask-tokens-in-encoder baseline; write pretrain_speed.md and .jsonl.",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=["tiny", "base", "large"],
        default=None,
        help="named configurations (default: tiny base, or none when --model is given)",
    )
    parser.add_argument("--model", default=None, help="also time this registered model (see `mae models`)")
    parser.add_argument("--batch", type=int, default=8, help="batch size for --model (default: %(default)s)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=BENCH_PRECISIONS,
        default=list(BENCH_PRECISIONS),
        help="fp32 and/or bf16 autocast (default: %(default)s)",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=list(DEFAULT_PEERS),
        help=f"engines to compare openmae with, from {', '.join(ENGINES)}; NAME@key=value,... forces "
        "openmae paths, e.g. openmae@attention=per_head,gemm=fp32 (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per repeat (default: 5 for tiny, 2 for base, 3 for --model)",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before timing, at least 1 (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per engine, interleaved (default: %(default)s)"
    )
    parser.add_argument(
        "--max-repeat-seconds",
        type=float,
        default=30.0,
        help="seconds a repeat may take: slower engines run fewer steps, at least one (default: %(default)s)",
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=3,
        help="repeats for engines whose single step exceeds --max-repeat-seconds (default: %(default)s)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: cuda when available; cuda without a GPU is an error)",
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weights, images and masks (default: %(default)s)"
    )
    parser.add_argument(
        "--optimizer",
        choices=["fused", "foreach"],
        default="fused",
        help="AdamW kernel, the same for every engine (default: %(default)s)",
    )
    parser.add_argument("--compile", action="store_true", help="also time openmae under torch.compile")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    parser.add_argument("--profile-peers", action="store_true", help="profile every engine, not only openmae")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run engines in this process (faster start; no per-engine memory; the C allocator, "
        "once openmae retains freed memory, is shared by every engine)",
    )
    parser.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="side of the matmuls that measure the peak (default: %(default)s)",
    )
    return parser


def options_from_args(args: argparse.Namespace, argv: list[str]) -> BenchOptions:
    device = resolve_device(args.device or "auto")
    named = named_configs(device)
    labels = args.configs if args.configs is not None else ([] if args.model else ["tiny", "base"])
    configs = [named[label] for label in labels]
    if args.model:
        configs.append(custom_config(args.model, args.batch))
    if args.warmup < 1 or args.repeats < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--warmup, --repeats and --steps must be at least 1")
    for name in args.peers:
        engine_spec(name)  # an unknown name or path is an error before anything runs
    if any(engine_spec(name).library == "hf" for name in args.peers):
        require("transformers")  # before anything runs: one line naming the extra
    return BenchOptions(
        configs=configs,
        precisions=list(args.precisions),
        peers=list(args.peers),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        max_repeat_seconds=args.max_repeat_seconds,
        slow_repeats=args.slow_repeats,
        device=str(device),
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        fused_optimizer=args.optimizer == "fused",
        compile=args.compile,
        profile=not args.no_profile,
        profile_peers=args.profile_peers,
        in_process=args.in_process,
        peak_size=args.peak_size,
        command=shlex.join(["mae", "bench", *argv]),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from command-line arguments; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args, argv)
    except ValueError as error:  # MissingExtraError included
        raise UsageError(str(error)) from error
    records = run_benchmark(options)
    md, jsonl = write_results(records, args.out)
    log(f"wrote {md} and {jsonl}")
    return 0
