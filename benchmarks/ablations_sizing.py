"""How long the shipped ablation studies take on this machine: a few minutes of measurement, then
a prediction for every job, piece and the whole set (`python benchmarks/ablations.py --calibrate`).

The calibration runs the studies' own jobs, shortened with `--set`-style overrides (a few dozen
steps, a few thousand images), as the real run runs them (`--parallel` at once, one thread each):
every distinct pretraining, one linear probe, k-NN and fine-tuning of the default variant, one
logistic regression, and a tiny job for the fixed cost of a job (start-up, data, model). From them:
each pretraining's training speed, the forward speed (feature extraction), the fine-tuning speed,
the cost of a probe's epoch over cached features and of logistic regression per image. A real
job's time is its images over the speed that applies, plus the fixed cost; jobs that pieces share
count in the first piece that has them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from openmae.config import config_from_dict
from openmae.data import build_dataset
from openmae.recipes.ablate import Job, plan
from openmae.recipes.ablate_run import run_jobs
from openmae.recipes.ablate_study import CONFIGS, load_study

SHORT = [
    "pretrain.max_steps=30", "pretrain.log_every=5", "pretrain.vis_every=0",
    "evals.max_steps=25", "evals.log_every=5", "evals.train_images=4000", "evals.val_images=4000",
    "linprobe.epochs=30", "linprobe.max_steps=null",
]  # fmt: skip
SHORT_SPLIT = {"train": 4000, "val": 4000}  # what SHORT leaves of the splits (k-NN, probe)


def plan_pieces(pieces: dict, out: Path, overrides: list[str] = ()) -> tuple[dict, dict]:
    """The jobs of every piece (`{piece: [job keys]}`, a shared job under its first piece)."""
    jobs: dict[str, Job] = {}
    owner: dict[str, list[str]] = {}
    for name, piece in pieces.items():
        studies = [load_study(n, list(overrides)) for n in piece.studies]
        piece_jobs, _ = plan(studies, out, list(piece.only) or None)
        owner[name] = [k for k in piece_jobs if k not in jobs]
        for key, job in piece_jobs.items():
            if key in jobs:
                jobs[key].used_by += job.used_by
            else:
                jobs[key] = job
    return jobs, owner


def calibrate(pieces: dict, out: Path, parallel: int, log=print) -> dict:
    """Run the shortened jobs into `out` and return the speeds (also written to `out/speeds.json`)."""
    short, _ = plan_pieces(pieces, out, SHORT)
    pretrainings = {
        k: j for k, j in short.items() if j.kind == "pretrain" and j.used_by[0].endswith("seed 0")
    }
    default = next(
        j for j in short.values() if j.kind == "pretrain" and "mask_ratio / 0.75 / seed 0" in j.used_by
    )
    evals = {  # the default variant's probe, k-NN and fine-tuning
        k: j
        for k, j in short.items()
        if any(u.startswith("mask_ratio / 0.75 / seed 0 / ") for u in j.used_by)
    }
    logreg = next(
        j for j in short.values() if j.kind == "logreg" and j.used_by[0].startswith("labels_scarce / 10%")
    )
    tiny = plan(
        [load_study("mask_ratio", [*SHORT, "evals.train_images=16", "evals.val_images=16"], seeds=[0])], out
    )[0]
    fixed = next(j for j in tiny.values() if j.kind == "knn" and j.needs == default.key)
    started, load_before = time.perf_counter(), os.getloadavg()
    outcome = run_jobs(pretrainings | evals | {logreg.key: logreg, fixed.key: fixed}, parallel, log=log)
    if not outcome.ok:
        raise RuntimeError(f"calibration jobs failed: {outcome.failed}")
    by_kind = {j.kind: j.result() for j in evals.values()}
    base = fixed.result()["seconds"]  # a job's own fixed cost: data, model, checkpoint
    images = SHORT_SPLIT["train"] + SHORT_SPLIT["val"]
    forward = images / max(by_kind["knn"]["seconds"] - base, 1e-3)
    head = (by_kind["linprobe"]["seconds"] - base - images / forward) / (30 * SHORT_SPLIT["train"])
    logreg_images = _images(config_from_dict(CONFIGS["logreg"], logreg.config), split_sizes(short))[0]
    speeds = {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "calibration_minutes": (time.perf_counter() - started) / 60,
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],  # 1/5/15 min, before, after
        "parallel": parallel,
        "startup_s": base + import_seconds(),
        "forward_images_per_s": forward,
        "finetune_images_per_s": _median_rate(next(j for j in evals.values() if j.kind == "finetune")),
        "probe_head_s_per_image_epoch": max(head, 0.0),
        "logreg_s_per_image": (logreg.result()["seconds"] - base) / logreg_images,
        "pretrain_images_per_s": {j.used_by[0]: j.result()["images_per_s"] for j in pretrainings.values()},
    }
    (out / "speeds.json").write_text(json.dumps(speeds, indent=2))
    return speeds


def import_seconds() -> float:
    """What a job process spends before its job starts: the interpreter and the imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import openmae.recipes.ablate_run"], check=True)
    return time.perf_counter() - started


def _median_rate(job: Job) -> float:
    path = job.folder / "metrics.jsonl"
    rates = [r["images_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "images_per_s" in r]
    return statistics.median(rates[1:] or rates)  # the first interval holds the warm-up


def job_seconds(job: Job, speeds: dict, sizes: dict) -> float:
    """The predicted wall time of a real job (one thread, next to the other parallel jobs)."""
    cfg = config_from_dict(CONFIGS[job.kind], job.config)
    train, val = _images(cfg, sizes)
    if job.kind == "pretrain":
        label = job.used_by[0].rsplit(" / seed ", 1)[0] + " / seed 0"
        rate = speeds["pretrain_images_per_s"].get(label) or statistics.median(
            speeds["pretrain_images_per_s"].values()
        )
        return speeds["startup_s"] + cfg.epochs * sizes["train"] / rate
    seconds = speeds["startup_s"]
    if job.kind == "logreg":
        return seconds + train * speeds["logreg_s_per_image"]
    if job.kind == "finetune":
        return (
            seconds
            + cfg.epochs * train / speeds["finetune_images_per_s"]
            + val / speeds["forward_images_per_s"]
        )
    seconds += (train + val) / speeds["forward_images_per_s"]
    if job.kind == "linprobe":
        seconds += cfg.epochs * train * speeds["probe_head_s_per_image_epoch"]
    return seconds


def _images(cfg, sizes: dict) -> tuple[int, int]:
    """Training and validation images a classification-like job uses."""
    train = sizes["train"]
    if getattr(cfg, "train_fraction", None):
        train = round(cfg.train_fraction * train)
    if getattr(cfg, "train_images", None):
        train = min(train, cfg.train_images)
    val = min(getattr(cfg, "val_images", None) or sizes["val"], sizes["val"])
    return train, val


def _load(speeds: dict) -> str:
    load = speeds.get("load_average")
    return f"{load[0]:.1f} / {load[3]:.1f}" if load else "not recorded"


def split_sizes(jobs: dict[str, Job]) -> dict[str, int]:
    """Training and validation images of the studies' data (that of their first job)."""
    data = config_from_dict(CONFIGS["knn"], {"data": next(iter(jobs.values())).config["data"]}).data
    return {
        split: len(build_dataset(data, split, 28, 1, train_transform=False)) for split in ("train", "val")
    }


def predict(pieces: dict, out: Path, speeds: dict) -> str:
    """A markdown sizing table: per piece its new jobs, job-minutes and wall minutes at `parallel`."""
    jobs, owner = plan_pieces(pieces, out)
    sizes = split_sizes(jobs)
    parallel = speeds["parallel"]
    lines = [
        f"Predicted from a calibration on {speeds['measured']} ({speeds['calibration_minutes']:.1f} min; "
        f"load average before / after {_load(speeds)}: on an idle 2-core machine it is below 2), "
        f"{parallel} jobs at a time, one thread each. A job starts in {speeds['startup_s']:.0f} s; forward "
        f"{speeds['forward_images_per_s']:.0f} images/s, fine-tuning "
        f"{speeds['finetune_images_per_s']:.0f} images/s.",
        "",
        "| piece | mae ablate ... | new jobs | pretrainings | job-minutes | wall minutes (/ parallel) |",
        "|---|---|---|---|---|---|",
    ]
    total = 0.0
    for piece, keys in owner.items():
        minutes = sum(job_seconds(jobs[k], speeds, sizes) for k in keys) / 60
        total += minutes
        pretrainings = sum(jobs[k].kind == "pretrain" for k in keys)
        cells = [
            piece,
            " ".join(pieces[piece].arguments()),
            len(keys),
            pretrainings,
            f"{minutes:.0f}",
            f"{minutes / parallel:.0f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append(f"| **all** | | {len(jobs)} | | {total:.0f} | **{total / parallel:.0f}** |")
    rates = speeds["pretrain_images_per_s"]
    lines += ["", "| pretraining (seed 0 shown) | images/s |", "|---|---|"]
    lines += [f"| {label.rsplit(' / seed', 1)[0]} | {rate:.0f} |" for label, rate in rates.items()]
    return "\n".join(lines) + "\n"
