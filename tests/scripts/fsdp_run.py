"""An FSDP2 fine-tune of a converted network, for tests/test_fsdp.py (under torchrun, gloo, CPU):

    torchrun --nproc_per_node=2 fsdp_run.py OUT [--resume] [--stop-after N] [--per-rank-dirs] [--no-shard]

A small conv net is converted (norms folded) and each cosine layer and the root are sharded with
``fully_shard``; it is distilled from the original (unsharded, on every rank) on fixed synthetic
images, with a checkpoint every 2 steps. ``--stop-after N`` ends the run when N samples have been read
on each rank, as a crash would (the process exits with 3). At the end every rank gathers the full
weights and saves them to OUT/final-rank{RANK}.pt, and OUT/shards-rank{RANK}.json records the shape
of its own shard of each parameter.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import Dataset

import cosconvert
from cosconvert.finetuning import finetune
from cosconvert.nn import _CosineMixin

SAMPLES, EPOCHS, BATCH = 64, 2, 8


class Images(Dataset):
    """Fixed synthetic images (no labels); with ``stop_after``, reading more than that many fails."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.x = torch.randn(SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        self.stop_after, self.read = stop_after, 0

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> torch.Tensor:
        self.read += 1
        if self.stop_after is not None and self.read > self.stop_after:
            raise SystemExit(3)
        return self.x[index]


def original() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6),
    ).eval()  # fmt: skip


def shard_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The shape of this rank's own shard of each parameter (the whole parameter where unsharded)."""
    return {name: list(p.to_local().shape) if hasattr(p, "to_local") else list(p.shape)
            for name, p in model.named_parameters()}  # fmt: skip


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher = original()
    model = cosconvert.convert(teacher, strip_norms="fold")
    if "--no-shard" not in args:
        for layer in [m for m in model.modules() if isinstance(m, _CosineMixin)]:
            fully_shard(layer)
        fully_shard(model)
    (out / f"shards-rank{rank}.json").write_text(json.dumps(shard_shapes(model)))
    stop = int(args[args.index("--stop-after") + 1]) if "--stop-after" in args else None
    folder = out / (f"checkpoints-rank{rank}" if "--per-rank-dirs" in args else "checkpoints")
    finetune(model, Images(stop), teacher=teacher, epochs=EPOCHS, batch_size=BATCH, lr=1e-2,
             checkpoint_dir=folder, checkpoint_every=2, resume="--resume" in args)  # fmt: skip
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    torch.save({k: v.detach().clone() for k, v in full.items()}, out / f"final-rank{rank}.pt")
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
