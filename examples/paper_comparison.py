"""The shape of the paper's comparison (Luo et al., 2017, Table 1) on scikit-learn's digits.

The same MLP and CNN, trained from scratch with no normalization, batch norm, weight norm,
layer norm, cosine and centered cosine normalization, several seeds each; prints a table of
test error (mean and standard deviation) and writes it with a plot of the training curves.

    python examples/paper_comparison.py [--seeds 3] [--epochs 30] [--out docs]
"""

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.data import DataLoader

from cosconvert.data import digits
from cosconvert.nn import CosineConv2d, CosineLinear

METHODS = ["none", "batch norm", "weight norm", "layer norm", "cosine", "centered cosine"]


def linear(method: str, n_in: int, n_out: int) -> nn.Module:
    if method in ("cosine", "centered cosine"):
        return CosineLinear(n_in, n_out, centered=method == "centered cosine", gain="channel")
    layer = nn.Linear(n_in, n_out)
    return weight_norm(layer) if method == "weight norm" else layer


def conv(method: str, n_in: int, n_out: int) -> nn.Module:
    if method in ("cosine", "centered cosine"):
        return CosineConv2d(n_in, n_out, 3, padding=1, centered=method == "centered cosine", gain="channel")
    layer = nn.Conv2d(n_in, n_out, 3, padding=1)
    return weight_norm(layer) if method == "weight norm" else layer


def norm(method: str, n: int, image: bool) -> nn.Module:
    if method == "batch norm":
        return nn.BatchNorm2d(n) if image else nn.BatchNorm1d(n)
    if method == "layer norm":
        return nn.GroupNorm(1, n) if image else nn.LayerNorm(n)
    return nn.Identity()


def mlp(method: str) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in [(64, 128), (128, 128)]:
        layers += [linear(method, n_in, n_out), norm(method, n_out, False), nn.ReLU()]
    return nn.Sequential(*layers, linear(method, 128, 10))


def cnn(method: str) -> nn.Module:
    layers: list[nn.Module] = []
    for n_in, n_out in [(1, 16), (16, 32)]:
        layers += [conv(method, n_in, n_out), norm(method, n_out, True), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), linear(method, 32 * 2 * 2, 10))


def train(model: nn.Module, epochs: int, seed: int) -> tuple[list[float], float]:
    """(training loss per epoch, test error in percent)."""
    train_set, (x_test, y_test) = digits("train"), digits("test").tensors
    loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    curve = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        curve.append(total / len(train_set))
    model.eval()
    with torch.no_grad():
        error = 100.0 * (model(x_test).argmax(1) != y_test).float().mean().item()
    return curve, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    results: dict = {}
    for arch, build in [("MLP", mlp), ("CNN", cnn)]:
        for method in METHODS:
            runs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                runs.append(train(build(method), args.epochs, seed))
            results[arch, method] = runs
            errors = [e for _, e in runs]
            print(f"{arch} {method:16} test error {statistics.mean(errors):5.2f} +- {statistics.pstdev(errors):.2f} %")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Cosine normalization vs other normalizers on digits (the shape of the paper's Table 1)",
        "",
        f"`python examples/paper_comparison.py --seeds {args.seeds} --epochs {args.epochs}`: scikit-learn digits "
        "(1347 train / 450 test), SGD lr 0.05 momentum 0.9, batch 64, trained from scratch. Test error in %, "
        "mean +- standard deviation over seeds.",
        "",
        "| normalization | MLP | CNN |",
        "|---|---|---|",
    ]
    for method in METHODS:
        cells = []
        for arch in ("MLP", "CNN"):
            errors = [e for _, e in results[arch, method]]
            cells.append(f"{statistics.mean(errors):.2f} +- {statistics.pstdev(errors):.2f}")
        lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
    lines += ["", "![training curves](paper_comparison.png)", ""]
    (out / "paper_comparison.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, arch in zip(axes, ("MLP", "CNN")):
        for method in METHODS:
            curves = [c for c, _ in results[arch, method]]
            mean = [statistics.mean(v) for v in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, label=method)
        ax.set(title=f"{arch} on digits", xlabel="epoch", ylabel="training loss (mean over seeds)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "paper_comparison.png", dpi=100)
    print(f"wrote {out / 'paper_comparison.md'} and {out / 'paper_comparison.png'}")


if __name__ == "__main__":
    main()
