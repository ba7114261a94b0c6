"""torchrun / DDP plumbing: one process per device, gloo on CPU, NCCL on GPUs.

``torchrun --standalone --nproc-per-node N -m swift_sampler train ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; ``init_distributed`` joins the group once per process (later
calls in the same process reuse it, so a search can call ``train`` many times). Rank 0 alone
writes files; every rank computes, and metrics are summed across ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from swift_sampler.storage.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """``device`` if given, else ``cuda:LOCAL_RANK`` when a GPU is present, else the CPU."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {device} asks for a GPU but this machine has none "
                             "(torch.cuda.is_available() is False); use --device cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``values`` (float64 on the CPU or the device) over ranks; identity when alone."""
    if info.distributed:
        # NCCL reduces device tensors only; gloo reduces CPU tensors.
        t = values.to(info.device) if info.device.type == "cuda" else values
        dist.all_reduce(t)
        return t.cpu()
    return values


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (used to share a decision, e.g. an error message)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DDP keeps parameters identical but lets each rank update its own running statistics after
    the last forward of an epoch; averaging them makes every rank hold the same model for
    validation and checkpoints (and uses every rank's data, unlike copying rank 0's).
    """
    if not info.distributed:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (the CLI calls this once, at exit)."""
    from swift_sampler.pipeline.process_group import process_group

    if process_group() is not None:
        dist.destroy_process_group()
