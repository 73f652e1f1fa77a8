"""Scale-out on a CPU: pretraining images/s with 1 and 2 processes, and memory per process, DDP vs FSDP.

    python benchmarks/bench_distributed.py                    # both parts, ~10 min on 2 cores
    python benchmarks/bench_distributed.py --parts speed      # or: memory
    python benchmarks/bench_distributed.py --memory-model mae_vit_large_patch16   # needs ~16 GB free

Sized for a 2-core CPU with gloo. Every measurement runs the real training step
(`Trainer.optimizer_step`: data pipeline on synthetic images, forward, backward, DDP all-reduce or
FSDP all-gather / reduce-scatter, AdamW) in fresh processes started by torchrun (or plainly, for one
process). Writes benchmarks/results/distributed_speed.md.

- speed: `mae_vit_tiny_patch4_32`, global batch 128: one process (1 and 2 threads) against two
  processes of one thread each (64 images each), median images/s over the timed steps.
- memory: a bigger model at a small image size (so that weights, gradients and Adam state dominate,
  not activations), DDP against FSDP over two processes: resident memory per process after the
  imports, after building the model, after the timed steps (steady state) and at its peak, next to
  the theory: replicated model state is 16 bytes a parameter (fp32 weight 4, gradient 4, Adam
  moments 8), sharded it is 16 / W, plus one block gathered at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "distributed_speed.md"
MB = 2**20


# ------------------------------------------------------------------------------------------------
# One measurement, in the process(es) being measured.


def rss_mb() -> float:
    """This process's resident memory now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace) -> None:
    """Build a Trainer as `mae pretrain` does, time its optimizer steps, write a JSON file per rank."""
    import torch

    torch.set_num_threads(args.threads)
    from openmae.data import DataConfig, build_dataset
    from openmae.distributed import init_distributed
    from openmae.engine.loop import Schedule, TrainConfig, Trainer
    from openmae.engine.optim import OptimConfig, build_optimizer
    from openmae.logging import RunLogger
    from openmae.models import create_model
    from openmae.recipes.pretrain import PretrainTask

    baseline = rss_mb()
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **overrides)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest_block = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    batch = args.global_batch // dist.world_size
    steps = args.warmup + args.steps
    cfg = TrainConfig(
        epochs=1, batch_size=batch, fsdp=args.fsdp, device="cpu", output_dir=args.out, log_every=10**9
    )
    data = DataConfig(dataset="synthetic", synthetic_size=args.global_batch * steps, num_workers=0)
    train_set = build_dataset(data, "train", model.config.img_size, model.config.in_chans)
    optimizer = build_optimizer(model, OptimConfig(), lr=1e-4)
    task, schedule = PretrainTask(model.num_patches, True), Schedule(1e-4, 0.0, 0.0)
    logger = RunLogger(args.out, enabled=False)
    trainer = Trainer(model, task, train_set, optimizer, schedule, cfg, dist, logger)
    built = rss_mb()
    batches = iter(trainer.loader)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.optimizer_step(batches)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    result = {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "threads": args.threads,
        "images_per_s": args.global_batch / statistics.median(timed),
        "step_s": [round(t, 4) for t in timed],
        "params": params,
        "largest_block_params": largest_block,
        "rss_baseline_mb": baseline,
        "rss_built_mb": built,
        "rss_steady_mb": rss_mb(),
        "rss_peak_mb": peak_rss_mb(),
    }
    # A file per rank: lines that two ranks print at once can interleave.
    Path(args.out, f"result-rank{dist.rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# The driver: start the measurements, gather their lines, write the table.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, worker_args: list[str]) -> list[dict]:
    """One measurement in `nproc` fresh processes; what every rank found."""
    out = tempfile.mkdtemp(prefix="bench-dist-")
    me = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--out", out, *worker_args]
    if nproc == 1:
        command = [sys.executable, *me]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *me,
        ]  # fmt: skip
    # glibc keeps freed memory below a threshold that it raises as big blocks come and go, so the
    # resident size would count freed blocks; a fixed threshold hands big blocks back at once.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    results = [json.loads(path.read_text()) for path in Path(out).glob("result-rank*.json")]
    shutil.rmtree(out, ignore_errors=True)
    if len(results) != nproc:
        raise RuntimeError(
            f"measurement failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return sorted(results, key=lambda r: r["rank"])


def speed_rows(args: argparse.Namespace) -> list[str]:
    common = ["--model", "mae_vit_tiny_patch4_32", "--global-batch", "128", "--steps", str(args.steps)]
    setups = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)
    rates: dict[tuple[int, int], list[float]] = {setup: [] for setup in setups}
    for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits every setup
        for nproc, threads in setups:
            rate = run(nproc, threads, common)[0]["images_per_s"]  # every rank times the same global steps
            rates[(nproc, threads)].append(rate)
            print(f"{nproc} process(es) x {threads} thread(s): {rate:.1f} images/s", flush=True)
    reference = max(rates[setups[0]])
    rows = []
    for nproc, threads in setups:
        found = rates[(nproc, threads)]
        label = "1 process" if nproc == 1 else f"{nproc} processes (torchrun, gloo, DDP)"
        rows.append(
            f"| {label} | {threads} | {128 // nproc} | {max(found):.1f} | {statistics.median(found):.1f} "
            f"| {max(found) / reference:.2f}x |"
        )
    return rows


def memory_rows(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    common = ["--model", args.memory_model, "--img-size", "64", "--global-batch", "16", "--steps", "3"]
    rows, found = [], {}
    for mode in ("ddp", "fsdp"):
        results = run(2, 1, [*common, *(["--fsdp"] if mode == "fsdp" else [])])
        found[mode] = results
        for r in results:
            rows.append(
                f"| {mode.upper()} | {r['rank']} | {r['rss_baseline_mb']:.0f} | {r['rss_built_mb']:.0f} | "
                f"{r['rss_steady_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
                f"{r['rss_steady_mb'] - r['rss_baseline_mb']:.0f} |"
            )
            print(rows[-1], flush=True)
    params, block = found["ddp"][0]["params"], found["ddp"][0]["largest_block_params"]

    def growth(mode: str, key: str) -> float:
        return statistics.mean(r[key] - r["rss_baseline_mb"] for r in found[mode])

    # Bytes a parameter, fp32 + AdamW (weight 4, gradient 4, two moments 8), over W = 2 processes.
    # DDP keeps everything, gradients too: they are views into its all-reduce buckets. FSDP keeps
    # 1/W of it; between steps its gradients are freed (zero_grad(set_to_none=True)); during a
    # step two blocks are gathered whole (the one running and the one prefetched), weights and grads.
    gathered = 2 * 8 * block / MB
    theory = {
        "steady": (16 * params / MB, 12 * params / 2 / MB),
        "peak": (16 * params / MB, 16 * params / 2 / MB + gathered),
    }
    measured = {
        "steady": (growth("ddp", "rss_steady_mb"), growth("fsdp", "rss_steady_mb")),
        "peak": (growth("ddp", "rss_peak_mb"), growth("fsdp", "rss_peak_mb")),
    }
    notes = [
        f"Model `{args.memory_model}` at 64x64 ({params / 1e6:.1f} M trainable parameters, largest block "
        f"{block / 1e6:.1f} M), global batch 16 (small activations next to the model state), AdamW, fp32. "
        "Memory is the resident size of each process (glibc told to hand big blocks back at once).",
        "",
        "Theory of the model state per process, P parameters over W = 2 processes: DDP holds weights, "
        "gradients (its all-reduce buckets) and Adam's two moments at all times, 16 B x P. FSDP holds "
        "1/W of each: between steps weights and moments, 12 B x P / W (the gradients are freed); during "
        "a step the gradient shards too, 16 B x P / W, plus two blocks gathered whole (weights and "
        f"gradients of the running and the prefetched block, {gathered:.0f} MiB).",
        "",
        "| model state per process (MiB) | DDP theory | DDP measured | FSDP theory | FSDP measured "
        "| saving, theory | saving, measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for when, label in (("steady", "between steps"), ("peak", "peak (in a step)")):
        (ddp_t, fsdp_t), (ddp_m, fsdp_m) = theory[when], measured[when]
        notes.append(
            f"| {label} | {ddp_t:.0f} | {ddp_m:.0f} | {fsdp_t:.0f} | {fsdp_m:.0f} | {ddp_t - fsdp_t:.0f} "
            f"| {ddp_m - fsdp_m:.0f} ({(ddp_m - fsdp_m) / (ddp_t - fsdp_t):.0%} of the theory's) |"
        )
    notes += [
        "",
        "Measured = resident size minus the size after the imports; it also holds the data pipeline, "
        "the activations and allocator slack (the ~100 MiB above the theory in both columns).",
    ]
    return rows, notes


def write_results(
    speed: list[str] | None, memory: tuple | None, args: argparse.Namespace, load: tuple
) -> None:
    import torch

    lines = [
        "# Scale-out on a CPU: DDP and FSDP with torchrun (gloo)",
        "",
        "Written by `"
        + " ".join(["python benchmarks/bench_distributed.py", *sys.argv[1:]])
        + f"`. Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        + f"load average {load[0]:.1f} before, {load[1]:.1f} after (other work slows every row).",
        "",
    ]
    if speed:
        lines += [
            "## Pretraining speed, `mae_vit_tiny_patch4_32`, global batch 128",
            "",
            f"Synthetic 32x32 images, fp32, AdamW. A measurement is the median step time of {args.steps} "
            f"steps after 2 warm-up steps, in fresh processes; each setup was measured {args.repeats} times, "
            "interleaved with the others; best and median of those are shown. The data pipeline runs in "
            "the training processes (num_workers=0).",
            "",
            "| run | threads per process | images per process and step | images/s, best | images/s, median "
            "| best vs 1 process, 1 thread |",
            "|---|---|---|---|---|---|",
            *speed,
            "",
        ]
    if memory:
        rows, notes = memory
        lines += [
            "## Memory per process, DDP vs FSDP (2 processes, one thread each)",
            "",
            *notes,
            "",
            "Each process:",
            "",
            "| mode | rank | RSS after imports (MiB) | after building (MiB) | after the steps (MiB) "
            "| peak (MiB) | after the steps - imports (MiB) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--parts", nargs="+", default=["speed", "memory"], choices=["speed", "memory"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per speed measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each speed setup")
    parser.add_argument("--memory-model", default="mae_vit_base_patch16", help="model of the memory part")
    # What one measurement does (internal: the driver passes these to the processes it starts).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mae_vit_tiny_patch4_32", help=argparse.SUPPRESS)
    parser.add_argument("--img-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        measure(args)
        return 0
    load_before = os.getloadavg()[0]
    speed = speed_rows(args) if "speed" in args.parts else None
    memory = memory_rows(args) if "memory" in args.parts else None
    write_results(speed, memory, args, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
