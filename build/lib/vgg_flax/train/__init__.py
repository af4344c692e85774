"""Training: pure train/eval steps, optimizers, the loop, checkpoints, warm starts and metrics."""
