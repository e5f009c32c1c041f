"""A fine-tuning run for the resume and torchrun tests: python finetune_run.py OUT [--resume] [--slow S]

Trains a small dropout MLP on fixed synthetic data with checkpoints every 3 steps, then
saves its final weights to OUT/final-rank{RANK}.pt.
"""

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from cosconvert.finetune import finetune


class Slow(TensorDataset):
    def __init__(self, *tensors, delay):
        super().__init__(*tensors)
        self.delay = delay

    def __getitem__(self, index):
        time.sleep(self.delay)
        return super().__getitem__(index)


def main() -> None:
    out = Path(sys.argv[1])
    delay = float(sys.argv[sys.argv.index("--slow") + 1]) if "--slow" in sys.argv else 0.0
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 4, (96,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    finetune(model, Slow(x, y, delay=delay), epochs=3, batch_size=8, checkpoint_dir=out / "checkpoints",
             checkpoint_every=3, resume="--resume" in sys.argv, progress=False)  # fmt: skip
    rank = int(__import__("os").environ.get("RANK", "0"))
    torch.save(model.state_dict(), out / f"final-rank{rank}.pt")


if __name__ == "__main__":
    main()
