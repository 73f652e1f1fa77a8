"""The paper's ablations on Fashion-MNIST, on a 2-core CPU in about 3 hours, in pieces of <= ~40 min.

Run:      python benchmarks/ablations.py                   (every piece, one after another)
          python benchmarks/ablations.py --pieces mask_ratio labels_scarce    (some of them)
          python benchmarks/ablations.py --quick           (a few steps per job: checks the wiring)
          python benchmarks/ablations.py --dry-run         (the jobs of each piece, and which are done)
Hardware: sized for 2 idle CPU cores and no GPU: `mae ablate --parallel 2`, one thread per job.
Writes:   benchmarks/results/ablations.md (rewritten after every piece), the plots next to it in
          benchmarks/results/ablations/; the runs go to --out (default /tmp/openmae-ablations).
          --quick writes its table into its own --out folder instead.
Resumes:  run the same command again: finished jobs are kept, a stopped pretraining or classifier
          continues from its checkpoint. Pieces share jobs (the default pretraining runs once, in
          the first piece that needs it), so run them into the same --out folder.

Each piece is one `mae ablate` call on the shipped studies (src/openmae/configs/ablations/): the
model, budget and seeds are in those files (_common.yaml has the shared ones), the sizing behind
them in the results file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ablations.md"

# Piece -> studies run together (in one `mae ablate` call). In this order, the first piece
# pretrains the default variant that most of the others share.
PIECES: dict[str, list[str]] = {
    "mask_ratio": ["mask_ratio"],
    "decoder_depth": ["decoder_depth"],
    "decoder_width": ["decoder_width"],
    "mask_tokens": ["mask_tokens"],
    "target_augmentation": ["target", "augmentation"],
    "mask_sampling": ["mask_sampling"],
    "partial_finetune": ["partial_finetune"],
    "labels_scarce": ["labels_scarce"],
}

# --quick: every job a few steps on a few images (the numbers mean nothing; the wiring is checked).
QUICK = [
    "pretrain.epochs=1", "pretrain.max_steps=10", "evals.epochs=1", "evals.max_steps=10",
    "evals.train_images=1024", "evals.val_images=500",
]  # fmt: skip

NOTES_FILE = ROOT / "benchmarks" / "results" / "ablations_notes.md"


def command_line(studies: list[str], out: Path, parallel: int, overrides: list[str]) -> str:
    text = f"mae ablate {' '.join(studies)} --out {out} --parallel {parallel}"
    return text + (f" --set {' '.join(overrides)}" if overrides else "")


def run_piece(name: str, out: Path, parallel: int, overrides: list[str], dry_run: bool) -> dict:
    """One `mae ablate` call; returns what the results file says of it."""
    from openmae.recipes.ablate import ablate

    studies = PIECES[name]
    print(
        f"[{time.strftime('%H:%M:%S')}] piece {name}: {command_line(studies, out, parallel, overrides)}",
        flush=True,
    )
    started = time.perf_counter()
    code = ablate(studies, out, parallel=parallel, overrides=overrides, dry_run=dry_run)
    return {"code": code, "seconds": time.perf_counter() - started}


def record(out: Path, name: str, outcome: dict) -> dict:
    """Add a run of a piece to `out/pieces.json` (wall times add up over resumed runs)."""
    path = out / "pieces.json"
    pieces = json.loads(path.read_text()) if path.exists() else {}
    entry = pieces.setdefault(name, {"seconds": 0.0, "runs": 0})
    entry["seconds"] += outcome["seconds"]
    entry["runs"] += 1
    entry["code"] = outcome["code"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pieces, indent=2))
    return pieces


def write_results(path: Path, out: Path, parallel: int, overrides: list[str], header: dict) -> None:
    """The results file: per study its table, plot and verdicts; per piece its command and wall time."""
    from openmae.recipes.ablate_report import markdown

    pieces = json.loads((out / "pieces.json").read_text()) if (out / "pieces.json").exists() else {}
    figures = path.parent / "ablations"
    lines = [
        "# The paper's ablations on Fashion-MNIST (2-core CPU)",
        "",
        f"Written by `python benchmarks/ablations.py{' --quick' if overrides else ''}`; machine: "
        f"{header['machine']}; torch {header['torch']}; started {header['started']}.",
        "Top-1 accuracy on the 10,000 test images (final weights), mean ± standard deviation over seeds "
        "(each seed also draws its own subsets); every seed is a dot in the plots.",
        "",
        "| piece | studies | command | wall time |",
        "|---|---|---|---|",
    ]
    for name, studies in PIECES.items():
        entry = pieces.get(name)
        wall = f"{entry['seconds'] / 60:.1f} min" if entry else "not run"
        command = command_line(studies, out, parallel, overrides)
        lines.append(f"| {name} | {', '.join(studies)} | `{command}` | {wall} |")
    for studies in PIECES.values():
        for study in studies:
            summary_path = out / study / "summary.json"
            if not summary_path.exists():
                continue
            summary = json.loads(summary_path.read_text())
            for key in ("plot", "pictures"):
                if summary.get(key):
                    target = figures / f"{study}-{summary[key]}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(out / study / summary[key], target)
                    summary[key] = f"{figures.name}/{target.name}"
            lines += ["", markdown(summary, heading="##").rstrip()]
    if NOTES_FILE.exists():
        lines += ["", NOTES_FILE.read_text().rstrip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pieces", nargs="+", choices=list(PIECES), default=list(PIECES), help="pieces to run"
    )
    parser.add_argument("--out", default=None, help="runs folder (default /tmp/openmae-ablations[-quick])")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at once (one thread each on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="a few steps per job, to check the wiring")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs of each piece and stop")
    args = parser.parse_args(argv)
    out = Path(args.out or f"/tmp/openmae-ablations{'-quick' if args.quick else ''}")
    overrides = QUICK if args.quick else []
    results = out / "ablations_quick.md" if args.quick else RESULTS
    import torch

    header = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    worst = 0
    for name in args.pieces:
        outcome = run_piece(name, out, args.parallel, overrides, args.dry_run)
        worst = max(worst, outcome["code"])
        if args.dry_run:
            continue
        record(out, name, outcome)
        write_results(results, out, args.parallel, overrides, header)
        if outcome["code"] == 3:  # stopped by a signal: the same command continues
            break
    if not args.dry_run:
        print(f"wrote {results}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
