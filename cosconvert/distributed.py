"""The process group a run is part of, under ``torchrun``: its rank and size, and sums across it.

Fine-tuning splits the data across ranks; calibration sums its statistics across them, so every
rank fits the same gains from all of the data.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "all_sum"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), starting the process group under torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: dict) -> dict:
    """``values`` (numbers and tensors) summed over every rank, in float64; as they are in one process.
    Every rank must call it with the same keys and shapes, in the same order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    flat = [torch.as_tensor(values[k], dtype=torch.float64).reshape(-1) for k in keys]
    sizes = [t.numel() for t in flat]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.cat(flat).to(device)
    dist.all_reduce(total)
    out = {}
    for key, part in zip(keys, total.cpu().split(sizes)):
        was = values[key]
        out[key] = part.reshape(was.shape).to(was.device) if isinstance(was, torch.Tensor) else part.item()
    return out
