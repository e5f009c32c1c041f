"""Training-step time of converted resnet18 relative to the original, side by side (CPU, float32).

python benchmarks/train_step.py [--batch 8] [--size 112] [--repeat 5]
"""

import argparse

import torch
import torch.nn.functional as F
import torchvision
from _timing import compare

import cosconvert


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    original = torchvision.models.resnet18().train()
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 1000, (args.batch,))
    candidates = {"original": step_fn(original, x, y)}
    for label, kwargs in [("cosine", {}), ("cosine, norms folded", {"strip_norms": "fold"}),
                          ("centered, norms folded", {"strip_norms": "fold", "centered": True})]:  # fmt: skip
        candidates[label] = step_fn(cosconvert.convert(original, **kwargs).train(), x, y)
    t = compare(candidates, repeat=args.repeat)
    print(f"resnet18 train step, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads")
    for name, seconds in t.items():
        print(f"{name:24} {seconds * 1e3:8.1f} ms  {seconds / t['original']:5.2f}x")


if __name__ == "__main__":
    main()
