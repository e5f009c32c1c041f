"""Cosine conv vs plain conv vs a naive unfold cosine, side by side (CPU, float32, batch 8).

    python benchmarks/layers.py [--batch 8] [--repeat 7]

Prints, per shape, forward and forward+backward times and the ratios
cosine / F.conv2d and unfold / cosine.
"""

import argparse

import torch
import torch.nn.functional as F
from _timing import compare

from cosconvert.functional import cosine_conv2d

SHAPES = {  # name: (in_channels, out_channels, size, kernel, stride, groups)
    "resnet stem 7x7 3->64 /2 @112": (3, 64, 112, 7, 2, 1),
    "resnet50 3x3 64->64 @56": (64, 64, 56, 3, 1, 1),
    "resnet50 3x3 256->256 @14": (256, 256, 14, 3, 1, 1),
    "resnet50 1x1 256->64 @56": (256, 64, 56, 1, 1, 1),
    "resnet50 1x1 1024->256 @14": (1024, 256, 14, 1, 1, 1),
    "mobilenet dw 3x3 144 @56": (144, 144, 56, 3, 1, 144),
}


def unfold_cosine(x, w, stride, padding, groups):
    """The obvious implementation: materialize every receptive field."""
    n, c, h, _ = x.shape
    k = w.shape[-1]
    cols = F.unfold(x, k, padding=padding, stride=stride)  # (N, C*k*k, L)
    cols = cols.view(n, groups, c // groups * k * k, -1)
    wg = w.view(groups, w.shape[0] // groups, -1)
    out = torch.einsum("ngkl,gok->ngol", cols, wg)
    out = out / (cols.norm(dim=2, keepdim=True).clamp_min(1e-6) * wg.norm(dim=2)[None, :, :, None].clamp_min(1e-6))
    side = (h + 2 * padding - k) // stride + 1
    return out.reshape(n, w.shape[0], side, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch {args.batch}\n")
    header = f"{'shape':28} {'pass':8} {'conv ms':>8} {'cos ms':>8} {'ctr ms':>8} {'unfold ms':>9} {'cos/conv':>8} {'ctr/conv':>8} {'unfold/cos':>10}"
    print(header)
    print("-" * len(header))
    for name, (cin, cout, size, k, stride, groups) in SHAPES.items():
        x = torch.randn(args.batch, cin, size, size, requires_grad=True)
        w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
        pad = k // 2
        fns = {
            "conv": lambda: F.conv2d(x, w, None, stride, pad, 1, groups),
            "cos": lambda: cosine_conv2d(x, w, None, stride, pad, 1, groups),
            "ctr": lambda: cosine_conv2d(x, w, None, stride, pad, 1, groups, centered=True),
            "unfold": lambda: unfold_cosine(x, w, stride, pad, groups),
        }
        for label, wrap in [("fwd", lambda f: f), ("fwd+bwd", lambda f: lambda: f().sum().backward())]:
            grad = label != "fwd"
            with torch.set_grad_enabled(grad):
                t = compare({key: wrap(fn) for key, fn in fns.items()}, repeat=args.repeat)
            print(
                f"{name:28} {label:8} {t['conv'] * 1e3:8.2f} {t['cos'] * 1e3:8.2f} {t['ctr'] * 1e3:8.2f} "
                f"{t['unfold'] * 1e3:9.2f} {t['cos'] / t['conv']:8.2f} {t['ctr'] / t['conv']:8.2f} "
                f"{t['unfold'] / t['cos']:10.1f}"
            )


if __name__ == "__main__":
    main()
