"""openmae's pretraining step at two git revisions, timed in one run with their repeats interleaved.

    python benchmarks/compare_revisions.py 1a5f902 HEAD --configs tiny base --precisions fp32 bf16

Each revision is checked out into a temporary git worktree and imported from there by a worker
process of its own (one per revision and configuration, so each has its own memory and caches); the
parent interleaves their repeats, so that a drift in the machine's speed is shared out. What is timed
is the revision's own benchmark engine for openmae (its training step: forward, backward, optimizer),
on the same model, batch, images and masks. Writes its table as this CPU's section of `--out`
(a rerun on the same kind of CPU replaces that section; the other CPUs' sections stay).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TITLE = "# openmae's training step at two revisions"
CONFIGS = {"tiny": ("mae_vit_tiny_patch4_32", 128, 5), "base": ("mae_vit_base_patch16", 8, 2)}


def serve(conn, src: str, model: str, batch: int, precision: str, threads: int) -> None:
    """A worker: import openmae from `src`, build its openmae engine, then time `steps` on request."""
    sys.path.insert(0, src)
    os.environ["OPENMAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="openmae-rev-")  # measure afresh
    import torch

    torch.set_num_threads(threads)
    from openmae.models import model_config

    step = build_step(model_config(model), batch, precision)
    for _ in range(3):  # the first steps measure the fast paths (where a revision does) and warm up
        step()
    while True:
        steps = conn.recv()
        if steps is None:
            break
        start = time.perf_counter()
        for _ in range(steps):
            step()
        conn.send(time.perf_counter() - start)


def build_step(config, batch: int, precision: str):
    """The revision's openmae training step, whichever benchmark API it has."""
    from openmae.bench import engines

    if hasattr(engines, "BenchEngine"):  # the loop's own step (this revision on)
        engine = engines.BenchEngine(engines.engine_spec("openmae"), config, batch, "cpu", precision)
        return engine.step
    return engines.TrainStep(engines.ENGINES["openmae"], config, batch, "cpu", precision)  # before


def checkout(revision: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), revision], check=True
    )
    return folder / "src"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("revisions", nargs=2, help="two git revisions, e.g. 1a5f902 HEAD")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["tiny", "base"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/revisions.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="openmae-revisions-"))
    context = multiprocessing.get_context("spawn")
    rows = []
    try:
        sources = [checkout(rev, tmp / f"rev{i}") for i, rev in enumerate(args.revisions)]
        for label in args.configs:
            model, batch, steps = CONFIGS[label]
            for precision in args.precisions:
                workers = []
                for src in sources:
                    parent, child = context.Pipe()
                    process = context.Process(
                        target=serve,
                        args=(child, str(src), model, batch, precision, args.threads),
                        daemon=True,
                    )
                    process.start()
                    workers.append((parent, process))
                seconds = [[] for _ in workers]
                for r in range(args.repeats):
                    for i in range(len(workers)) if r % 2 == 0 else reversed(range(len(workers))):
                        workers[i][0].send(steps)
                        seconds[i].append(workers[i][0].recv())
                for conn, process in workers:
                    conn.send(None)
                    process.join(timeout=60)
                rates = [statistics.median(batch * steps / s for s in times) for times in seconds]
                rows.append((label, model, batch, precision, rates))
                print(f"{label} {precision}: " + ", ".join(f"{r:.3g}" for r in rates), flush=True)
    finally:
        for i in range(2):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / f"rev{i}")],
                           check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
    write(rows, args)
    return 0


def write(rows, args) -> None:
    """The run's table as the section of this CPU in `--out`: a rerun on the same kind of CPU replaces
    its section, another CPU's sections stay."""
    from openmae import hardware  # the checkout this script runs from names the machine

    a, b = args.revisions
    cpu = hardware.describe_cpu()
    lines = [
        f"## {cpu}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Command: `python benchmarks/compare_revisions.py {a} {b} --configs {' '.join(args.configs)} "
        f"--precisions {' '.join(args.precisions)}`; {args.threads} threads, {args.repeats} interleaved "
        "repeats, median images/s.",
        "",
        f"| config | precision | {a} | {b} | {b} / {a} |",
        "|---|---|---|---|---|",
    ]
    for label, model, batch, precision, (before, after) in rows:
        lines.append(f"| {label} (`{model}`, batch {batch}) | {precision} | {before:.3g} | {after:.3g} | "
                     f"{after / before:.2f}x |")  # fmt: skip
    out = Path(args.out)
    sections = out.read_text().split("\n## ") if out.exists() else [TITLE]
    kept = [sections[0].rstrip()] + [f"## {s.rstrip()}" for s in sections[1:] if not s.startswith(cpu)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join([*kept, "\n".join(lines)]) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
