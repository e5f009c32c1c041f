"""Blockwise reconstruction: time per block, and peak memory against the model's size.

Peak memory is what reconstruct added on top of the models and data already in memory: on the
CPU the process's peak resident set (Linux VmHWM), reset just before ``reconstruct`` through
/proc/self/clear_refs and read right after; on CUDA the allocator's peak (``max_memory_allocated``),
reset the same way. It is set beside the parameters' size and beside what one block's and all
blocks' inputs and targets take for the same samples (counted with hooks on the original).

    python benchmarks/reconstruct.py [--model resnet18] [--size 64] [--samples 256] [--steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import torchvision

import cosconvert
from cosconvert.reconstruction import find_blocks, reconstruct

MB = 2**20


def _rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _activation_bytes(model: torch.nn.Module, blocks: list[str], x: torch.Tensor) -> list[int]:
    """Bytes of each block's input and output on ``x``, from hooks on ``model``."""
    sizes = {}

    def hook(name):
        return lambda m, args, out: sizes.__setitem__(name, sum(t.nbytes for t in (*args, out)))

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [sizes[n] for n in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (reconstruct's amp is its default there: bf16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = getattr(torchvision.models, args.model)(num_classes=10).eval()
    x = torch.randn(args.samples, 3, args.size, args.size)
    converted = cosconvert.convert(original, strip_norms="fold", calibration_data=[x[:64]])
    blocks = find_blocks(original)
    per_block = _activation_bytes(original, blocks, x)
    params = sum(p.nbytes for p in original.parameters())
    cuda = args.device.startswith("cuda")
    converted.to(args.device), original.to(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        base = _rss("VmRSS")
    result = reconstruct(converted, original, x, steps=args.steps, batch_size=args.batch_size, max_samples=args.samples)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")) - base
    print(f"{args.model}, {args.samples} images of 3x{args.size}x{args.size}, {args.steps} steps of {args.batch_size}")
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, amp {result.get('amp')}")
    print("\n| block | parameters MB | inputs + targets MB | seconds | loss before | loss after |")
    print("|---|---|---|---|---|---|")
    for row, size in zip(result["blocks"], per_block):
        block_params = sum(p.nbytes for p in converted.get_submodule(row["block"]).parameters())
        print(f"| {row['block']} | {block_params / MB:.1f} | {size / MB:.1f} | {row['seconds']:.1f} | "
              f"{row['loss_before']:.3g} | {row['loss_after']:.3g} |")  # fmt: skip
    print(f"\nmodel parameters: {params / MB:.1f} MB; inputs + targets of the largest block: "
          f"{max(per_block) / MB:.1f} MB; of all blocks together: {sum(per_block) / MB:.1f} MB")  # fmt: skip
    kind = "CUDA memory allocated" if cuda else "resident memory"
    print(f"peak {kind} added by reconstruct: {peak / MB:.1f} MB; total time {result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
