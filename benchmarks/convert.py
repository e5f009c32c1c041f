"""Time to convert resnet50 and vit_b_16, next to fx.symbolic_trace alone, side by side.

python benchmarks/convert.py [--repeat 3]
"""

import argparse

import torch.fx as fx
import torchvision
from _timing import compare

import cosconvert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'model':10} {'symbolic_trace s':>17} {'convert s':>10} {'fold s':>8} {'convert/trace':>14}")
    for name in ["resnet50", "vit_b_16"]:
        model = torchvision.models.get_model(name).eval()
        t = compare(
            {
                "trace": lambda: fx.symbolic_trace(model),
                "convert": lambda: cosconvert.convert(model),
                "fold": lambda: cosconvert.convert(model, strip_norms="fold"),
            },
            repeat=args.repeat,
            warmup=1,
        )
        print(f"{name:10} {t['trace']:17.3f} {t['convert']:10.3f} {t['fold']:8.3f} {t['convert'] / t['trace']:14.1f}")


if __name__ == "__main__":
    main()
