"""Calibration under torchrun, for tests/test_distributed.py:

    torchrun --nproc_per_node=2 calibrate_run.py OUT

Rank r calibrates the converted net of fsdp_run.py on its own batches (batches r, r + 2 of
``batches()``) and saves every parameter to OUT/calibrated-rank{r}.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_run import original

import cosconvert


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(4)]


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = original()
    converted = cosconvert.convert(teacher, strip_norms="fold")
    result = cosconvert.calibrate(converted, teacher, batches()[rank::world])
    torch.save({"state": converted.state_dict(), "status": result["status"]}, out / f"calibrated-rank{rank}.pt")
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
