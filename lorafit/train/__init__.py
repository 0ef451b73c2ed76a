"""The training run: loop, step, optimizer, checkpoints and resume, the run folder, metrics, processes."""
