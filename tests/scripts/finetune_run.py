"""A fine-tuning run for the resume and torchrun tests:

    python finetune_run.py OUT [--resume] [--slow S] [--dropout P] [--per-rank-dirs]

Trains a small MLP on fixed synthetic data with checkpoints every 3 steps, then saves its final
weights to OUT/final-rank{RANK}.pt. Each training step appends the sample indices of its batch, one line a
step, to OUT/steps-rank{RANK}.txt (OUT/steps-rank{RANK}-resumed.txt for a resumed run), so the
tests see which steps each process ran and on which samples. ``--per-rank-dirs`` gives each rank its own
checkpoint folder, OUT/checkpoints-rank{RANK}, so the tests can tell which ranks wrote.
"""

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from cosconvert.finetuning import finetune

SAMPLES, EPOCHS, BATCH = 96, 3, 8


class Slow(TensorDataset):
    def __init__(self, *tensors, delay: float):
        super().__init__(*tensors)
        self.delay = delay

    def __getitem__(self, index):
        time.sleep(self.delay)
        return super().__getitem__(index)


def record_steps(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Each forward in training appends its batch's sample indices to ``path`` (line-buffered, so a
    killed process leaves every step it ran)."""
    index_of = {tuple(row.tolist()): i for i, row in enumerate(x)}
    log = open(path, "a", buffering=1)

    def hook(module, inputs):
        if module.training:
            log.write(" ".join(str(index_of[tuple(row.tolist())]) for row in inputs[0]) + "\n")

    model.register_forward_pre_hook(hook)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, 8, generator=g), torch.randint(0, 4, (SAMPLES,), generator=g)


def build(dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4))


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv
    option = lambda name, default: float(args[args.index(name) + 1]) if name in args else default  # noqa: E731
    resume = "--resume" in args
    rank = int(os.environ.get("RANK", "0"))
    folder = out / (f"checkpoints-rank{rank}" if "--per-rank-dirs" in args else "checkpoints")
    model = build(option("--dropout", 0.3))
    x, y = data()
    record_steps(model, x, out / f"steps-rank{rank}{'-resumed' if resume else ''}.txt")
    finetune(model, Slow(x, y, delay=option("--slow", 0.0)), epochs=EPOCHS, batch_size=BATCH,
             checkpoint_dir=folder, checkpoint_every=3, resume=resume, progress=False)  # fmt: skip
    torch.save(model.state_dict(), out / f"final-rank{rank}.pt")


if __name__ == "__main__":
    main()
