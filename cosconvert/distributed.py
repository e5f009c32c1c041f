"""The process group a run is part of, under ``torchrun``: its rank and size, and sums across it.

Fine-tuning and reconstruction split the data across ranks; calibration sums its statistics across
them, so every rank fits the same gains from all of the data. A model sharded with FSDP2
(``fully_shard``) reduces its own gradients; a replicated one has them averaged here, as DDP would.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["rank_and_world", "all_sum", "average_gradients", "fsdp_modules", "whole_parameters"]


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


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of replicated parameters over the ranks, as DDP does. FSDP2's sharded
    parameters (DTensors) are left alone: FSDP reduces their gradients itself in the backward."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is not None and not isinstance(p, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def fsdp_modules(module: nn.Module) -> list[FSDPModule]:
    """The modules at or under ``module`` that FSDP2's ``fully_shard`` sharded."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """FSDP2: ``module``'s parameters gathered whole for the duration (forward passes included), and
    what is written to them kept: on the way out each is scattered back into its rank's shard. FSDP
    itself would drop such writes when it reshards. Without FSDP this does nothing. Afterwards each
    sharded module reshards after its forward again (FSDP's default below the root), whatever
    ``reshard_after_forward`` it was given: FSDP offers no public way to read that setting back."""
    sharded = fsdp_modules(module)
    if not sharded:
        yield
        return
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        written = {name: p.detach().clone() for name, p in module.named_parameters()}
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if isinstance(p, DTensor):
                    p.copy_(distribute_tensor(written[name], p.device_mesh, p.placements))
