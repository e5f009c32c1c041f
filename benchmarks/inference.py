"""PyTorch inference of a converted network against the original, side by side (CPU, float32).

    python benchmarks/inference.py [--model resnet50] [--repeat 7]

The converted net keeps its BatchNorms (the default) or has them folded in; `frozen` is
`cosconvert.freeze(converted)`, whose weights are normalized once instead of on every call.
"""

import argparse

import torch
import torchvision
from _timing import compare

import cosconvert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    original = torchvision.models.get_model(args.model).eval()
    nets = {"original": original}
    for strip in (False, "fold"):
        converted = cosconvert.convert(original, strip_norms=strip).eval()
        label = "norms folded" if strip else "norms kept"
        nets[f"converted, {label}"] = converted
        nets[f"frozen, {label}"] = cosconvert.freeze(converted)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, 224x224, float32\n")
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            t = compare({name: lambda net=net: net(x) for name, net in nets.items()}, repeat=args.repeat)
        for name, seconds in t.items():
            print(f"batch {batch}  {name:26} {seconds * 1e3:9.1f} ms  {seconds / t['original']:5.2f}x")
        print()


if __name__ == "__main__":
    main()
