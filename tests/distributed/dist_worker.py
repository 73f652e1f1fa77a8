"""What the distributed tests launch with torchrun: `mae` itself, plus markers the tests can read.

`python -m torch.distributed.run ... dist_worker.py pretrain key=value ...` runs `mae pretrain` on
every rank exactly as `torchrun -m openmae pretrain` does. Before, each rank writes its pid to
`<output_dir>/pid-rank<R>` (so a test can kill one); after, it prints `DONE rank=R code=C`, so a
test can tell a finished run from one that crashed, whatever the launcher's exit code says.

With `CHECK_COLLECTIVES=1` in the environment each rank then also runs the evaluation helpers of
`openmae.distributed` on a small index set, in the run's process group, and writes what it got to
`<output_dir>/collectives-rank<R>.json`. With `START_METHOD=spawn` (or `fork`, `forkserver`) the
data-loading workers start that way instead of the platform's default. With `RECORD_SAMPLES=1`
each rank appends the labels and seeds of every pretraining micro-batch it trains on to
`<output_dir>/samples-rank<R>.jsonl` (one line a micro-batch).

Ranks share one stdout: every marker goes out in a single `write` (atomic on a pipe), as a `print`
of text and newline is two writes that another rank's output can land between.
"""

import json
import multiprocessing
import os
import sys
from pathlib import Path


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def output_dir(argv: list[str]) -> Path | None:
    out_dirs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("output_dir=")]
    return Path(out_dirs[-1]) if out_dirs else None


def check_collectives(out_dir: Path) -> int:
    import torch

    from openmae import distributed as d

    info = d.init_distributed("cpu")
    indices = torch.tensor(list(d.ShardedEvalSampler(11)))  # shards of 6 and 5 samples
    sums = d.all_reduce_sum(torch.tensor([float(indices.sum()), float(len(indices))]))
    rows = d.all_gather_cat(torch.stack([indices, indices * 10], dim=1))  # [N_r, 2] -> [11, 2]
    result = {"rank": info.rank, "sums": sums.tolist(), "rows": rows.tolist()}
    (out_dir / f"collectives-rank{info.rank}.json").write_text(json.dumps(result))
    d.cleanup()
    return 0


def record_samples(out_dir: Path) -> None:
    from openmae.engine.tasks import PretrainTask

    path = out_dir / f"samples-rank{os.environ.get('RANK', '0')}.jsonl"
    loss_of_batch = PretrainTask.__call__

    def recorded(self, model, batch, device):
        _, labels, seeds = batch
        with path.open("a") as f:
            f.write(json.dumps({"labels": labels.tolist(), "seeds": seeds.tolist()}) + "\n")
        return loss_of_batch(self, model, batch, device)

    PretrainTask.__call__ = recorded


def run_cli(argv: list[str]) -> int:
    from openmae.cli import main

    out_dir = output_dir(argv)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"pid-rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
        if os.environ.get("RECORD_SAMPLES") == "1":
            record_samples(out_dir)
    return main(argv)


if __name__ == "__main__":
    if os.environ.get("START_METHOD"):
        multiprocessing.set_start_method(os.environ["START_METHOD"])
    code = run_cli(sys.argv[1:])
    if code == 0 and os.environ.get("CHECK_COLLECTIVES") == "1":
        code = check_collectives(output_dir(sys.argv[1:]))
    say(f"DONE rank={os.environ.get('RANK', '0')} code={code}")
    sys.exit(code)
