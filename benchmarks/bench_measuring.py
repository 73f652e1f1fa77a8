"""What measuring the fast paths costs: a model's first training step with a fresh tuner (no
cache), against the steps after it, and the seconds each measured shape took.

    python benchmarks/bench_measuring.py --config base --precision bf16
    python benchmarks/bench_measuring.py --model mae_vit_debug --batch 4 --precision bf16 --steps 2

The first step times every attention kernel and (bf16 on a CPU) every matrix product's path for
each new shape; a machine pays it once, as the choices are cached per machine. Prints a table and
writes benchmarks/results/measuring_cost_<label>_<precision>[_<tag>].md.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

from openmae import hardware
from openmae.accel.tuner import Autotuner
from openmae.bench.engines import ENGINES, BenchEngine
from openmae.bench.run import cpu_config, named_configs
from openmae.models import model_config

RESULTS = Path(__file__).parent / "results"


class StopwatchTuner(Autotuner):
    """An in-memory tuner that records the seconds each measured key took, not counting the keys
    measured inside it (an attention kernel's first run can meet new product shapes)."""

    def __init__(self) -> None:
        super().__init__(cache_file=None)
        self.own_seconds: dict[str, tuple[float, str]] = {}  # entry -> (seconds, choice)
        self._inner = [0.0]  # per open measurement: seconds spent in keys measured inside it

    def choose(self, kind, key, candidates, handicaps=None):
        entry = f"{kind}:{key}"
        if entry in self.choices:
            return self.choices[entry]
        self._inner.append(0.0)
        start = time.perf_counter()
        choice = super().choose(kind, key, candidates, handicaps)
        seconds = time.perf_counter() - start
        inner = self._inner.pop()
        self._inner[-1] += seconds
        self.own_seconds[entry] = (seconds - inner, choice)
        return choice


def run(model: str, batch: int, precision: str, steps: int) -> tuple[list[float], StopwatchTuner]:
    """Seconds of each of `steps` training steps of openmae's engine, and the tuner it measured with."""
    engine = BenchEngine(ENGINES["openmae"], model_config(model), batch, "cpu", precision)
    tuner = StopwatchTuner()
    accel = engine.trainer.accel
    accel.tuner = accel.attention.tuner = tuner
    if accel.gemm is not None:
        accel.gemm.tuner = tuner
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        hardware.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, tuner


def report(
    command: str, label: str, batch: int, precision: str, seconds: list[float], tuner: StopwatchTuner
) -> str:
    measured = sorted(tuner.own_seconds.items(), key=lambda item: -item[1][0])
    total = sum(s for s, _ in tuner.own_seconds.values())
    longest = measured[0][1][0] if measured else 0.0
    later = min(seconds[1:]) if len(seconds) > 1 else float("nan")
    lines = [
        f"# Measuring cost: {label}, batch {batch}, {precision} ({date.today()})",
        "",
        f"- CPU: {hardware.describe_cpu()}; {torch.get_num_threads()} threads; torch {torch.__version__}",
        f"- Command: `python benchmarks/bench_measuring.py {command}`",
        f"- First step {seconds[0]:.2f} s, later steps {later:.2f} s (fastest of {len(seconds) - 1}); "
        f"{len(measured)} shapes measured in {total:.2f} s, at most {longest:.2f} s one "
        "(its own time, without the shapes measured inside it)",
        "",
        "| shape | seconds | chosen | each candidate, ms per run |",
        "|---|---:|---|---|",
    ]
    for entry, (own, choice) in measured:
        kind, key = entry.split(":", 1)
        runs = ", ".join(f"{name} {1e3 * s:.1f}" for name, s in tuner.seconds[entry].items())
        lines.append(f"| {kind}: {key} | {own:.2f} | {choice} | {runs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(named_configs(torch.device("cpu"))), default="base")
    parser.add_argument("--model", help="a registered model name instead of --config (with --batch)")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="steps to run, the first one measuring")
    parser.add_argument("--threads", type=int, default=hardware.usable_cores())
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    config = cpu_config(args.config, args.model, args.batch)
    seconds, tuner = run(config.model, config.batch, args.precision, args.steps)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table = report(command, config.label, config.batch, args.precision, seconds, tuner)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"measuring_cost_{config.label}_{args.precision}{'_' + args.tag if args.tag else ''}.md"
    (args.out / name).write_text(table)
    print(f"written to {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
