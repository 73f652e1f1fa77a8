"""Where a training step's memory peaks, for openmae engines that differ in what they keep for
backward: each engine in fresh processes (alternating), the process's peak RSS and, from the
profiler's memory events over one step, the live peak above the step's start and when it falls.

    python benchmarks/bench_memory.py --engines openmae@attention=sdpa hf_sdpa \
        openmae@attention=sdpa,norm=recompute

Peak RSS is what a user sees and what `mae bench` reports; the live peak is what the step itself
holds at its worst, which is what a GPU's caching allocator tracks. On a CPU the two can disagree:
the C heap's high-water mark depends on fragmentation too. Writes
benchmarks/results/memory_<config>_<precision>[_<tag>].md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

from openmae import hardware
from openmae.bench.engines import engine_spec
from openmae.bench.run import cpu_config, named_configs
from openmae.bench.worker import ProcessWorker
from openmae.models import model_config

RESULTS = Path(__file__).parent / "results"


def measure(engine: str, model: str, batch: int, precision: str, steps: int, threads: int) -> dict:
    """In a fresh worker process (`mae bench`'s): build (one step), time `steps` steps, read the
    process's peak RSS, then profile one more step for its live memory."""
    worker = ProcessWorker(threads)
    try:
        worker.call(
            "build", spec=engine_spec(engine), config=model_config(model), batch_size=batch,
            device="cpu", precision=precision, seed=0, fused_optimizer=True,
        )  # fmt: skip
        step_s = worker.call("run", steps=steps) / steps
        peak_rss = worker.call("memory")["peak_bytes"]
        live = worker.call("live_memory")
        paths = worker.call("paths")
    finally:
        worker.close()
    return {
        "peak_rss_mb": peak_rss / 2**20,
        "live_peak_mb": live["live_peak_bytes"] / 2**20,
        "live_peak_at": live["live_peak_at"],
        "step_s": step_s,
        "attention": attention_choices(paths),
    }


def attention_choices(paths: dict[str, str]) -> str:
    """The attention kernels the engine's tuner chose, per shape: `[B, N, 3, heads, head_dim] kernel`."""
    chosen = [(key, name) for key, name in paths.items() if key.startswith("attention:")]
    shapes = [key.split("[", 1)[1].split("]")[0] for key, _ in chosen]
    kernels = [name.split(" (")[0] for _, name in chosen]  # without the candidates' timings
    return "; ".join(f"[{shape}] {kernel}" for shape, kernel in zip(shapes, kernels, strict=True)) or "-"


def report(command: str, label: str, batch: int, precision: str, results: dict[str, list[dict]]) -> str:
    lines = [
        f"# Step memory: {label}, batch {batch}, {precision} ({date.today()})",
        "",
        f"- CPU: {hardware.describe_cpu()}; torch {torch.__version__}",
        f"- Command: `python benchmarks/bench_memory.py {command}`",
        "- Each engine in fresh worker processes, alternating; peak RSS before any profiling; live peak: "
        "the most one more step holds above what it started with (profiler memory events), and when "
        "in the step (0 = start, 1 = end)",
        "",
        "| engine | peak RSS MB (each process) | live peak MB (each) | live peak at | step s (median) "
        "| attention chosen (each process, where they differ) |",
        "|---|---|---|---|---|---|",
    ]
    for engine, runs in results.items():
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in runs)
        live = ", ".join(f"{r['live_peak_mb']:.1f}" for r in runs)
        at = ", ".join(f"{r['live_peak_at']:.2f}" for r in runs)
        step = statistics.median(r["step_s"] for r in runs)
        chosen = dict.fromkeys(r["attention"] for r in runs)
        lines.append(f"| `{engine}` | {rss} | {live} | {at} | {step:.3g} | {' / '.join(chosen)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["openmae", "openmae@norm=recompute"])
    parser.add_argument("--config", choices=sorted(named_configs(torch.device("cpu"))), default="base")
    parser.add_argument("--model", help="a registered model name instead of --config")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per engine")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process, after the first")
    parser.add_argument("--threads", type=int, default=hardware.usable_cores())
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args(argv)
    config = cpu_config(args.config, args.model, args.batch)
    results: dict[str, list[dict]] = {engine: [] for engine in args.engines}
    for _ in range(args.processes):
        for engine in args.engines:
            run = measure(engine, config.model, config.batch, args.precision, args.steps, args.threads)
            results[engine].append(run)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table = report(command, config.label, config.batch, args.precision, results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory_{config.label}_{args.precision}{'_' + args.tag if args.tag else ''}.md"
    path.write_text(table)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
