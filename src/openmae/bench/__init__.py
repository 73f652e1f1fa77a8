"""Pretraining speed benchmark (`mae bench`): openmae against HuggingFace ViTMAE and the
mask-tokens-in-encoder baseline, plus the data pipeline.

- `engines`: what is timed (same weights, same masks, same optimizer for everyone).
- `precision`: fp32, bf16 autocast, and bf16 GEMMs as fp32 GEMMs on CPUs without bf16 units.
- `worker`: one process per engine, so each gets its own peak memory; repeats are interleaved.
- `machine`: machine description and the measured matrix-multiply peak.
- `profiling`: torch.profiler breakdown of a step; `data`: JPEG pipeline throughput.
- `run`, `report`, `cli`: orchestration, results files, argument parsing.
"""

from openmae.bench.cli import main

__all__ = ["main"]
