"""The paper's ablations on Fashion-MNIST, on a 2-core CPU in about 3 hours, in pieces of <= ~40 min.

Run:      python benchmarks/ablations.py                   (every piece, one after another)
          python benchmarks/ablations.py --pieces mask_ratio labels_scarce    (some of them)
          python benchmarks/ablations.py --quick           (a few steps per job: checks the wiring)
          python benchmarks/ablations.py --dry-run         (the jobs of each piece, and which are done)
          python benchmarks/ablations.py --calibrate       (~10 min: measure, predict each piece's time)
Hardware: sized for 2 idle CPU cores and no GPU: `mae ablate --parallel 2`, one thread per job.
Writes:   benchmarks/results/ablations/: per study its section (STUDY.md), summary (STUDY.json) and
          plots, and pieces.json (wall time and machine of each piece); a piece rewrites only its
          own studies' files. benchmarks/results/ablations.md is assembled from them after every
          piece. The runs go to --out (default /tmp/openmae-ablations). --quick writes its
          table and sections into its own --out folder instead.
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
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from openmae.hardware import describe_cpu

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ablations.md"
SIZING = ROOT / "benchmarks" / "results" / "ablations_sizing.md"
DEFAULT_OUT = Path("/tmp/openmae-ablations")
STORE = ROOT / "benchmarks" / "results" / "ablations"  # per study its section, summary and plots


@dataclass(frozen=True)
class Piece:
    """Studies run together in one `mae ablate` call (`only`: some of their variants)."""

    studies: tuple[str, ...]
    only: tuple[str, ...] = ()

    def arguments(self) -> list[str]:
        return [*self.studies, *(["--only", *self.only] if self.only else [])]


# In this order, the first piece pretrains the default variant that most of the others share
# (a piece run first of all pays for it: ~12 min more).
PIECES: dict[str, Piece] = {
    "target_augmentation": Piece(("target", "augmentation")),
    "mask_ratio": Piece(("mask_ratio",)),
    "decoder_depth": Piece(("decoder_depth",)),
    "decoder_width_mask_tokens": Piece(("decoder_width", "mask_tokens")),
    "mask_sampling_partial": Piece(("mask_sampling", "partial_finetune")),
    "labels_scarce_1_10": Piece(("labels_scarce",), ("1%", "10%")),
    "labels_scarce_100": Piece(("labels_scarce",), ("100%",)),
}

# --quick: every job a few steps on a few images (the numbers mean nothing; the wiring is checked).
QUICK = [
    "pretrain.epochs=1", "pretrain.max_steps=10", "evals.epochs=1", "evals.max_steps=10",
    "evals.train_images=1024", "evals.val_images=500",
]  # fmt: skip

NOTES = """\
## How the budget was chosen

The shared settings are in `src/openmae/configs/ablations/_common.yaml`; every study changes only
its own variable. What decided them (measured on this machine, 1 thread per job, while other jobs
shared it: ~half an idle core each):

- Model `mae_vit_mini_patch4_28` (encoder 128 x 6, decoder 64 x 2, 49 tokens): the size of
  `benchmarks/results/fashion_mnist.md`; its decoder is the paper's scaled to the encoder (half the
  width, a third of the depth), so the default variant of every study is the model's own.
- The cost is the count of pretrainings: 15 distinct variants x 2 seeds = 30. Their relative cost
  per image (training step alone, best of 3, batch 256): mask ratio 0.25 / 0.5 / 0.75 / 0.9 =
  2.6 / 1.7 / 1.0 / 0.6; decoder depth 1 / 2 / 4 / 8 = 1.0 / 1.0 / 1.9 / 2.3; width 32 / 64 / 128 =
  1.0 / 1.0 / 1.7; mask tokens in the encoder 4.5; block sampling 1.4 (drawn per image in Python).
  At ~300 images/s for the default on an idle core, one epoch of the 60k images is 3.3 min and the
  30 pretrainings ~100 of the ~190 minutes; the evaluations (about 110 jobs) take the rest.
- Pretraining: 1 epoch, batch 128 (468 steps), base lr 1.5e-3 (10x the paper's, as in
  fashion_mnist.md), 0.25 warm-up epoch. Trial runs (seed 0, one each): batch 128 beat 256 at equal
  images (loss 0.755 against 0.784; probe 77.7% against 76.9% after 2 epochs); a 4x higher lr gave a
  probe of 74.1%, below a random encoder. 2 epochs instead of 1 raised the probe by 0.3 points
  (77.7% against 77.5%) for twice the pretraining time: not worth halving the variants.
- What that buys: after 1 epoch the linear probe (10-20k images) is < 1 point above a random
  encoder's (77.5% against 76.7%), but the k-NN is 6.7 points above it (73.5% against 66.8%) and a
  short fine-tuning of 5k images 10.7 points above the same from scratch (54.2% against 43.5%).
  Expect the k-NN and fine-tuning columns to carry the findings, and the probe to be mostly
  inconclusive: the paper's probe gains appear after hundreds of epochs. Every plot draws the
  random encoder as a line.
- Linear probe: the paper's head and LARS, 90 epochs on cached features of 10k training images
  (half of the features it extracts are the 10k test images'). k-NN: a bank of 10k. Fine-tuning: 3
  epochs on 5k images, batch 128 (117 steps), the recipe of fashion_mnist.md; batch 64 (234 steps)
  did worse for the pretrained encoder (52.7%) and better from scratch (50.2%).
- The probe's LARS factor (ImageNet's size / the labelled images) is capped so that a step moves
  the head by at most 1% of its norm: uncapped, the 1% and 10% subsets diverged to NaN in the first
  run of the labels-scarce study, and the trial runs above (10k images) had steps 5x larger.
- Labels scarce: the fine-tunings see about 15-18k labelled images for 1% (30 epochs of 600) and
  10% (3 of 6000), and one epoch (60k) for 100%; the probe uses all the labelled images.
- Two seeds for every point (a seed also draws the subsets); a finding counts when a difference
  exceeds twice its standard error over seeds. With two seeds that spread is itself rough.

## With more compute

- Pretrain for tens of epochs (fashion_mnist.md's 21.7 epochs gave a probe of 85.6% against 78.5%
  for a random encoder) and use at least three seeds; then the probe, not only k-NN and
  fine-tuning, can decide the paper's findings. `--set pretrain.epochs=20` reruns any study so.
- Fine-tune on all 60k images for several epochs (the paper's fine-tuning differences are below a
  point, likely within this run's seed spread), and probe all 60k features.
- A model closer to the paper's proportions (ViT-B/L: 12-24 blocks) for the decoder-depth and
  partial fine-tuning studies, whose effects grow with the encoder's depth.
"""


def command_line(piece: Piece, out: Path, parallel: int, overrides: list[str]) -> str:
    text = f"mae ablate {shlex.join(piece.arguments())} --out {out} --parallel {parallel}"
    return text + (f" --set {' '.join(overrides)}" if overrides else "")


def run_piece(name: str, out: Path, parallel: int, overrides: list[str], dry_run: bool) -> dict:
    """One `mae ablate` call; returns its exit code and wall time."""
    from openmae.recipes.ablate import ablate

    piece = PIECES[name]
    command = command_line(piece, out, parallel, overrides)
    print(f"[{time.strftime('%H:%M:%S')}] piece {name}: {command}", flush=True)
    started = time.perf_counter()
    only = list(piece.only) or None
    code = ablate(
        list(piece.studies), out, parallel=parallel, only=only, overrides=overrides, dry_run=dry_run
    )
    return {"code": code, "seconds": time.perf_counter() - started, "command": command}


def record(out: Path, store: Path, name: str, outcome: dict, machine: str) -> None:
    """Add a run of a piece to `out/pieces.json` (wall times add up over resumed runs into the same
    folder) and copy its total into `store/pieces.json`, which keeps the pieces of other runs."""
    entry = update_json(out / "pieces.json", name, lambda e: {
        "seconds": e.get("seconds", 0.0) + outcome["seconds"], "runs": e.get("runs", 0) + 1,
        "code": outcome["code"], "command": outcome["command"], "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
    })  # fmt: skip
    update_json(store / "pieces.json", name, lambda _: entry)


def update_json(path: Path, key: str, change) -> dict:
    """`data[key] = change(data.get(key, {}))` in the JSON file at `path`; returns the new entry."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = change(data.get(key, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data[key]


def store_studies(out: Path, store: Path) -> None:
    """Copy the summary of every study run into `out` to `store/STUDY.json` and its section to
    `store/STUDY.md` (plots beside them): a study run elsewhere keeps its stored section."""
    from openmae.recipes.ablate_report import markdown

    store.mkdir(parents=True, exist_ok=True)
    for study in studies_in_order():
        summary_path = out / study / "summary.json"
        if not summary_path.exists():
            continue
        summary = json.loads(summary_path.read_text())
        for key in ("plot", "pictures"):
            if summary.get(key):
                target = store / f"{study}-{summary[key]}"
                shutil.copyfile(out / study / summary[key], target)
                summary[key] = f"{store.name}/{target.name}"
        (store / f"{study}.json").write_text(json.dumps(summary, indent=2) + "\n")
        (store / f"{study}.md").write_text(markdown(summary, heading="##"))


def studies_in_order() -> list[str]:
    return list(dict.fromkeys(s for piece in PIECES.values() for s in piece.studies))


def write_results(path: Path, store: Path, parallel: int, overrides: list[str]) -> None:
    """The results file from the store: per piece its command, wall time and machine; per study its
    table, plot and verdicts; then how the budget was chosen and the predicted times."""
    path_of_pieces = store / "pieces.json"
    pieces = json.loads(path_of_pieces.read_text()) if path_of_pieces.exists() else {}
    lines = [
        "# The paper's ablations on Fashion-MNIST (2-core CPU)",
        "",
        f"Written by `python benchmarks/ablations.py{' --quick' if overrides else ''}` from the sections "
        f"in `{store.name}/` (each piece rewrites its studies'; the others are kept).",
        "Top-1 accuracy on the 10,000 test images (final weights), mean ± standard deviation over seeds "
        "(each seed also draws its own subsets); every seed is a dot in the plots.",
        "",
        "| piece | studies | command | wall time | run on |",
        "|---|---|---|---|---|",
    ]
    for name, piece in PIECES.items():
        entry = pieces.get(name)
        wall = f"{entry['seconds'] / 60:.1f} min" if entry else "not run"
        where = f"{entry['machine']}, {entry['date']}" if entry else ""
        command = entry["command"] if entry else command_line(piece, DEFAULT_OUT, parallel, overrides)
        lines.append(f"| {name} | {', '.join(piece.studies)} | `{command}` | {wall} | {where} |")
    for study in studies_in_order():
        section = store / f"{study}.md"
        if section.exists():
            lines += ["", section.read_text().rstrip()]
    lines += ["", NOTES.rstrip()]
    if SIZING.exists():  # the prediction `--calibrate` wrote, one level down
        lines += ["", SIZING.read_text().replace("# ", "## ", 1).rstrip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def calibrate(out: Path, parallel: int) -> int:
    """Shortened jobs of every piece, then the predicted time of each piece: benchmarks/results/."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ablations_sizing import calibrate as measure
    from ablations_sizing import predict

    speeds = measure(PIECES, out, parallel)
    table = predict(PIECES, out, speeds)
    title = (
        "# Ablation studies: predicted wall time\n\nWritten by `python benchmarks/ablations.py --calibrate`."
    )
    SIZING.write_text(f"{title}\n\n{table}")
    print(table)
    print(f"wrote {SIZING}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pieces", nargs="+", choices=list(PIECES), default=list(PIECES), help="pieces to run"
    )
    parser.add_argument("--out", default=None, help="runs folder (default /tmp/openmae-ablations[-quick])")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at once (one thread each on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="a few steps per job, to check the wiring")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs of each piece and stop")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine, predict the times")
    args = parser.parse_args(argv)
    if args.calibrate:
        return calibrate(Path(args.out or "/tmp/openmae-ablations-calibration"), args.parallel)
    out = Path(args.out or f"{DEFAULT_OUT}{'-quick' if args.quick else ''}")
    overrides = QUICK if args.quick else []
    results = out / "ablations_quick.md" if args.quick else RESULTS
    store = out / "ablations" if args.quick else STORE
    import torch

    machine = f"{describe_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}"
    worst = 0
    for name in args.pieces:
        outcome = run_piece(name, out, args.parallel, overrides, args.dry_run)
        worst = max(worst, outcome["code"])
        if args.dry_run:
            continue
        record(out, store, name, outcome, machine)
        store_studies(out, store)
        write_results(results, store, args.parallel, overrides)
        if outcome["code"] == 3:  # stopped by a signal: the same command continues
            break
    if not args.dry_run:
        print(f"wrote {results}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
