"""Pretraining speed benchmark; the same as `mae bench` (see `--help`).

    python benchmarks/bench_pretrain.py --configs tiny base --precisions fp32 bf16

Sized for a 2-core CPU; writes benchmarks/results/pretrain_speed.md and .jsonl.
"""

import sys

from openmae.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
