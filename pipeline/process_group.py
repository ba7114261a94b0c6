"""Whether a torch.distributed process group is running: the one place that asks.

In ``pipeline`` (the lowest package that needs it) so that feature building, the loader and
the trainer's helpers all agree; ``train.distributed`` builds on it.
"""

from __future__ import annotations


def process_group():
    """``torch.distributed`` when a process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


__all__ = ["process_group", "rank_and_world"]
