"""Compiled inference (resnet18 by default): the original against the converted network with norms kept, with
norms folded, and folded then frozen (weights normalized once), side by side in one run.

    python benchmarks/compile_frozen.py [--model resnet18] [--threads 1] [--repeat 7]

It shows how much of the compiled converted network's extra time is normalizing every weight on
every call, which ``cosconvert.freeze`` removes.
"""

import argparse

import torch
import torchvision
from _timing import compare

import cosconvert


def compiled_inference(model: torch.nn.Module, x: torch.Tensor):
    compiled = torch.compile(model.eval(), fullgraph=True)

    def run():
        with torch.no_grad():
            return compiled(x)

    run()  # compile before any timing
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 112, 112)
    original = torchvision.models.get_model(args.model).eval()
    models = {
        "original": original,
        "converted": cosconvert.convert(original),
        "folded": cosconvert.convert(original, strip_norms="fold"),
        "frozen": cosconvert.freeze(cosconvert.convert(original, strip_norms="fold")),
    }
    times = compare({name: compiled_inference(m, x) for name, m in models.items()}, repeat=args.repeat, warmup=1)
    for name, t in times.items():
        print(f"{name:10} {t * 1e3:8.1f} ms  {t / times['original']:.2f}x")


if __name__ == "__main__":
    main()
