"""Training: models, the sharded loader, the training loop and its checkpoints, evaluation,
the sampler stage (oversample-and-filter) and per-image training dynamics."""
