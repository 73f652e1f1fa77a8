"""Training engine: one loop, tasks, optimizer, schedule, checkpoints, evaluation."""
