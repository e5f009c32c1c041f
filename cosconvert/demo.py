"""The bundled example: a small BatchNorm CNN for scikit-learn's 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from cosconvert.data import digits


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x3 and a linear classifier, for (N, 1, 8, 8) inputs."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, width, 1), block(width, width, 2), block(width, 2 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def train_digits_cnn(epochs: int = 8, seed: int = 0, lr: float = 3e-3) -> DigitsCNN:
    """A DigitsCNN trained with labels on the digits train split (a few seconds on a CPU)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    loader = DataLoader(digits("train"), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: str = "test") -> float:
    """Top-1 accuracy in percent on a digits split."""
    x, y = digits(split).tensors
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()
