"""swift_sampler."""
