"""Pretraining speed benchmark (`mae bench`): openmae against HuggingFace ViTMAE and the
mask-tokens-in-encoder baseline, every engine timed through the training loop users run.

- `engines`: what is timed (models and `accel` settings plugged into `engine.loop.Trainer`).
- `worker`: one process per engine, so each gets its own peak memory; repeats are interleaved.
- `machine`: machine description and the measured matrix-multiply peak.
- `profiling`: torch.profiler breakdown of a step.
- `run`, `report`, `cli`: orchestration, results files, argument parsing.

The data pipeline's speed is measured by `benchmarks/bench_data.py`.
"""

from openmae.bench.cli import main

__all__ = ["main"]
