"""Training: the loop, data, callbacks, checkpoints."""
