"""Rank helpers: one code path from one CPU process to many GPUs under torchrun.

What it knows: whether torch.distributed is initialised, this process's rank and world size, and sum/max
reductions of tensors and Python numbers. At world size 1 (no torchrun) every helper is a no-op returning its input,
so the trainer never branches on "distributed or not". What it does not know: models, wrapping (DDP/FSDP2 belong to
the scale-out work), or training.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 logs, evaluates and writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device) -> None:
    """Initialise the process group when started by torchrun with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if launched_by_torchrun() and not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched)."""
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def barrier() -> None:
    if is_initialized():
        dist.barrier()
