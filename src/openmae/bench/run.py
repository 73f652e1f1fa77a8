"""Running the benchmark: for each configuration and precision, build every engine in its own
worker, warm it up, then time interleaved repeats and collect memory and a profile.

Everything measured becomes a plain-dict record (`kind` = "machine", "step", "profile", "data")
that `report` writes as JSON lines and renders as markdown.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from openmae.bench.engines import DEFAULT_PEERS, EngineSpec, engines_for, optimizer_step_seconds, step_flops
from openmae.bench.machine import load_average, machine_info, matmul_peak
from openmae.bench.worker import EngineError, LocalWorker, ProcessWorker
from openmae.models import model_config

# The precisions the benchmark times (fp16 autocast needs a GPU grad scaler: not a CPU comparison).
BENCH_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class BenchConfig:
    """A named model size and batch, with its default steps per repeat."""

    label: str
    model: str
    batch: int
    steps: int


def named_configs(device: torch.device) -> dict[str, BenchConfig]:
    """The named configurations: small batches on a CPU, a GPU's batches (ViT-B 128, ViT-L 64) on a GPU."""
    on_gpu = device.type == "cuda"
    return {
        "tiny": BenchConfig("tiny", "mae_vit_tiny_patch4_32", 128, steps=5),
        "base": BenchConfig("base", "mae_vit_base_patch16", 128 if on_gpu else 8, steps=10 if on_gpu else 2),
        "large": BenchConfig(
            "large", "mae_vit_large_patch16", 64 if on_gpu else 2, steps=10 if on_gpu else 1
        ),
    }


@dataclass
class BenchOptions:
    """What to run (the CLI's flags); see `openmae.bench.cli` for their meaning."""

    configs: list[BenchConfig]
    precisions: list[str] = field(default_factory=lambda: list(BENCH_PRECISIONS))
    peers: list[str] = field(default_factory=lambda: list(DEFAULT_PEERS))
    steps: int | None = None
    warmup: int = 2
    repeats: int = 5
    max_repeat_seconds: float = 30.0
    slow_repeats: int = 3
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    fused_optimizer: bool = True
    compile: bool = False
    profile: bool = True
    profile_peers: bool = False
    in_process: bool = False
    peak_size: int = 2048
    command: str = ""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(options: BenchOptions) -> list[dict]:
    """Measure everything `options` asks for; returns the records in order."""
    device = torch.device(options.device)
    torch.set_num_threads(options.threads)
    started = time.time()
    machine = {"kind": "machine", **machine_info(device), "command": options.command}
    machine["load_before"] = load_average()
    machine["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    log(f"matmul peaks on {machine['cpu']} with {options.threads} threads")
    peaks = [{p: matmul_peak(device, p, options.peak_size) for p in options.precisions}]
    machine["optimizer"] = "AdamW, " + ("fused" if options.fused_optimizer else "foreach")
    records: list[dict] = [machine]
    for config in options.configs:
        flops = {m: step_flops(model_config(config.model), mask_tokens=m) for m in (False, True)}
        records.append(_optimizer_record(config))
        for precision in options.precisions:
            records += run_group(options, config, precision, flops)
    log("matmul peaks again (a busy machine may have lowered the first measurement)")
    peaks.append({p: matmul_peak(device, p, options.peak_size) for p in options.precisions})
    machine["matmul_peak"] = {p: _best_of(peak[p] for peak in peaks) for p in options.precisions}
    for row in records:
        if row["kind"] == "step" and row.get("achieved_flops"):
            row["peak_flops"] = machine["matmul_peak"][row["precision"]]["peak"]
            row["peak_share"] = row["achieved_flops"] / row["peak_flops"]
    machine["load_after"] = load_average()
    machine["duration_s"] = round(time.time() - started, 1)
    return records


def run_group(options: BenchOptions, config: BenchConfig, precision: str, flops: dict) -> list[dict]:
    """All engines of one configuration and precision, their repeats interleaved."""
    names = ["openmae", *options.peers] + (["openmae_compile"] if options.compile else [])
    specs = engines_for(names, precision, torch.device(options.device).type)
    rows = {s.name: _new_row(config, precision, s, flops[s.mask_tokens]) for s in specs}
    workers: dict[str, ProcessWorker | LocalWorker] = {}
    try:
        for spec in specs:
            log(f"{config.label} {precision}: building {spec.name}")
            worker = LocalWorker(options.threads) if options.in_process else ProcessWorker(options.threads)
            workers[spec.name] = worker
            with engine_failures(rows[spec.name]) as row:
                row.update(_start(worker, spec, config, precision, options))
        _interleave(options.repeats, workers, rows, f"{config.label} {precision}")
        profiles = []
        for name, row in rows.items():
            if row["error"] is None:
                with engine_failures(row):
                    row.update(_memory(workers[name]), paths=workers[name].call("paths"))
            if row["error"] is None and options.profile and (name == "openmae" or options.profile_peers):
                log(f"{config.label} {precision}: profiling {name}")
                profiles += _profile(workers[name], row)
        return [_finish(row) for row in rows.values()] + profiles
    finally:
        for worker in workers.values():
            worker.close()


@contextlib.contextmanager
def engine_failures(row: dict) -> Iterator[dict]:
    """An engine failure inside marks `row` failed (and is logged) instead of stopping the benchmark."""
    try:
        yield row
    except EngineError as error:
        row["error"] = _last_line(error)
        log(f"{row['engine']} failed:\n{error}")


def _start(worker, spec: EngineSpec, config: BenchConfig, precision: str, options: BenchOptions) -> dict:
    """Build and warm up an engine, then plan its repeats from the warm step time."""
    row = _warm_up(worker, spec, config, precision, options)
    steps = options.steps or config.steps
    row["steps_per_repeat"] = _steps_per_repeat(row["warm_step_s"], steps, options.max_repeat_seconds)
    slow = row["warm_step_s"] > options.max_repeat_seconds
    row["planned_repeats"] = min(options.repeats, options.slow_repeats) if slow else options.repeats
    return row


def _interleave(repeats: int, workers: dict, rows: dict[str, dict], label: str) -> None:
    """Repeat r runs every live engine once, starting one further along each time, so that drift
    in the machine's speed is shared out."""
    for r in range(repeats):
        live = [name for name, row in rows.items() if row["error"] is None and r < row["planned_repeats"]]
        for name in live[r % max(1, len(live)) :] + live[: r % max(1, len(live))]:
            with engine_failures(rows[name]) as row:
                row["seconds"].append(workers[name].call("run", steps=row["steps_per_repeat"]))
        log(f"{label}: repeat {r + 1}/{repeats} done")


def _optimizer_record(config: BenchConfig) -> dict:
    """AdamW step time, fused kernel vs multi-tensor (foreach), on the model's parameters."""
    mae_config = model_config(config.model)
    seconds = {
        kind: optimizer_step_seconds(mae_config, fused=kind == "fused") for kind in ("fused", "foreach")
    }
    return {"kind": "optimizer", "config": config.label, "model": config.model, "seconds": seconds}


def _new_row(config: BenchConfig, precision: str, spec: EngineSpec, flops_per_image: int) -> dict:
    return {
        "kind": "step",
        "config": config.label,
        "model": config.model,
        "batch": config.batch,
        "precision": precision,
        "engine": spec.name,
        "about": spec.about,
        "flops_per_step": flops_per_image * config.batch,
        "load_average": load_average(),
        "seconds": [],
        "error": None,
    }


def _warm_up(worker, spec: EngineSpec, config: BenchConfig, precision: str, options: BenchOptions) -> dict:
    """Build (its first step is the first warm-up step), then the remaining warm-up steps."""
    built = worker.call(
        "build",
        spec=spec,
        config=model_config(config.model),
        batch_size=config.batch,
        device=options.device,
        precision=precision,
        seed=options.seed,
        fused_optimizer=options.fused_optimizer,
    )
    warm = built["first_step_s"]
    # An engine slower than a repeat's budget gets no extra warm-up: its first step warmed it.
    # A compiled one does: its first step is mostly compilation.
    if warm <= options.max_repeat_seconds or spec.compile:
        for _ in range(options.warmup - 1):
            warm = worker.call("run", steps=1)
    return {"first_loss": built["first_loss"], "first_step_s": built["first_step_s"], "warm_step_s": warm}


def _steps_per_repeat(step_seconds: float, steps: int, max_seconds: float) -> int:
    """`steps`, or fewer (at least one) when they would take longer than `max_seconds`."""
    return max(1, min(steps, int(max_seconds // max(step_seconds, 1e-9))))


def _memory(worker) -> dict:
    memory = worker.call("memory")
    found = {"memory_kind": memory["kind"], "peak_memory_bytes": memory["peak_bytes"]}
    if "idle_bytes" in memory:
        found["idle_memory_bytes"] = memory["idle_bytes"]
    return found


def _profile(worker, row: dict) -> list[dict]:
    """A one-step profile record, or none if profiling fails (the timings stand regardless)."""
    try:
        found = worker.call("profile", steps=1)
    except EngineError as error:
        log(f"profiling {row['engine']} failed:\n{error}")
        return []
    keys = ("config", "model", "batch", "precision", "engine")
    return [{"kind": "profile", **{k: row[k] for k in keys}, **found}]


def _finish(row: dict) -> dict:
    """Images/s per repeat -> median and min-max, and the achieved FLOP/s."""
    seconds = row.pop("seconds")
    if row["error"] is not None or not seconds:
        return row
    rates = [row["batch"] * row["steps_per_repeat"] / s for s in seconds]
    median = statistics.median(rates)
    row.update(
        images_per_s=median,
        images_per_s_min=min(rates),
        images_per_s_max=max(rates),
        images_per_s_repeats=rates,
        step_s=row["batch"] / median,
        achieved_flops=row["flops_per_step"] * median / row["batch"],
    )
    return row


def _best_of(measurements) -> dict:
    """Per way of multiplying, the best of several peak measurements."""
    best: dict[str, float] = {}
    for found in measurements:
        for way, flops in found.items():
            best[way] = max(best.get(way, 0.0), flops)
    return best


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def custom_config(model: str, batch: int, steps: int = 3) -> BenchConfig:
    """A configuration for any registered model and batch (`--model NAME --batch N`)."""
    model_config(model)  # unknown names fail here, with a suggestion
    return BenchConfig(model, model, batch, steps)


def cpu_config(name: str, model: str | None = None, batch: int | None = None) -> BenchConfig:
    """A benchmark script's `--config NAME` (a named CPU configuration), or `--model` in its place,
    at `--batch` if given, else the named configuration's batch."""
    named = named_configs(torch.device("cpu"))[name]
    if model:
        return custom_config(model, batch or named.batch)
    return replace(named, batch=batch or named.batch)
