#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU checks of benchmarks/gpu_check.py (parity, bf16/fp16 runs with
# resume, torch.compile, the ViT-B/ViT-L speed table against HF), in under 10 minutes.
# Writes benchmarks/results/gpu/gpu_check.md and pretrain_speed.md. Without a GPU it runs the CPU
# fallback at test sizes and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec python benchmarks/gpu_check.py "$@"
