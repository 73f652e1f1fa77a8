"""Test-wide settings."""

import torch

# The tests use tiny models, for which one thread is as fast as two, and it keeps them from
# fighting over the cores (OpenMP spin-waits) when anything else runs on the machine.
torch.set_num_threads(1)
