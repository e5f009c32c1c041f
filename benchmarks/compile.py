"""torch.compile (inductor) of converted networks against the compiled originals, side by side.

    python benchmarks/compile.py [--device cpu] [--batch 4] [--size 112] [--repeat 3]
        [--models resnet18 resnet50 mobilenet_v3_large vit_b_16] [--passes inference training]
        [--freezing] [--runs 1]

For each model: inference (eval, no_grad) and a training step (forward, backward, SGD update), each
compiled with ``fullgraph=True``; then single cosine convolutions against plain ones at the ResNet
shapes of benchmarks/layers.py (the stem and four of ResNet-50), compiled the same way (forward only,
and forward+backward).
Compilation happens before timing; ratios are converted / original, interleaved (see _timing.py).

``--strip-norms fold`` converts with the networks' normalizers folded into the cosine layers, as a
network is served (and as benchmarks/onnx_latency.py exports it); by default they are kept.

``--freezing`` sets inductor's ``freezing`` for both networks: inference graphs then treat parameters
as constants, so each cosine layer's weight norms are computed once at compile time instead of on
every call (training graphs are unchanged). It assumes the weights no longer change, as serving does.

``--floor`` times, instead, compiled inference of each model's floor beside the original and the
converted network: the converted network with every ``1 / |x|`` a constant (benchmarks/onnx_floor.py).

``--runs N`` repeats the models' part in N fresh processes and prints each ratio and their median: the
same compiled pair moved by up to 0.15 from one process to the next on the 2-core machine, more than
between the repeats inside one (before _timing.py kept freed memory in the process; since, 0.01-0.05).
"""

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
import torchvision
from _timing import compare
from layers import SHAPES
from train_step import step_fn

import cosconvert
from cosconvert.functional import cosine_conv2d


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(model, x, y):
    return step_fn(torch.compile(model, fullgraph=True), x, y)


def infer(model, x):
    compiled = torch.compile(model, fullgraph=True)

    def run():
        with torch.no_grad():
            return compiled(x)

    return run


def timed(device: str, fn):
    def run():
        fn()
        sync(device)

    return run


def models(args) -> None:
    print(f"{'model':20} {'pass':9} {'original ms':>12} {'cosine ms':>10} {'ratio':>6} {'compile s':>10}")
    for name in args.models:
        torch.manual_seed(0)
        kwargs = {"image_size": args.size} if name.startswith("vit") else {}
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        y = torch.randint(0, 1000, (args.batch,), device=args.device)
        for label, make in [("inference", infer), ("training", train_step)]:
            if label not in args.passes:
                continue
            train = label == "training"
            original = torchvision.models.get_model(name, **kwargs).to(args.device).train(train)
            converted = cosconvert.convert(original, strip_norms=args.strip_norms or False).train(train)
            start = time.perf_counter()
            fns = {"original": timed(args.device, make(original, x) if not train else make(original, x, y)),
                   "cosine": timed(args.device, make(converted, x) if not train else make(converted, x, y))}  # fmt: skip
            for fn in fns.values():  # compile both before any timing
                fn()
            compile_s = time.perf_counter() - start
            t = compare(fns, repeat=args.repeat, warmup=1)
            print(
                f"{name:20} {label:9} {t['original'] * 1e3:12.1f} {t['cosine'] * 1e3:10.1f} "
                f"{t['cosine'] / t['original']:6.2f} {compile_s:10.0f}",
                flush=True,
            )
            torch._dynamo.reset()


def floors(args) -> None:
    """Compiled inference of the original, the converted network and its floor (benchmarks/onnx_floor.py:
    every cosine layer's ``1 / |x|`` a constant), side by side: what the norms themselves cost."""
    from onnx_floor import floor_model  # here: it brings onnxruntime, which the other parts do not need

    print(f"{'model':20} {'original ms':>12} {'cosine':>7} {'floor':>7}")
    for name in args.models:
        torch.manual_seed(0)
        kwargs = {"image_size": args.size} if name.startswith("vit") else {}
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        original = torchvision.models.get_model(name, **kwargs).to(args.device).eval()
        converted = cosconvert.convert(original, strip_norms=args.strip_norms or False)
        nets = {"original": original, "cosine": converted, "floor": floor_model(converted, x)}
        fns = {key: timed(args.device, infer(net, x)) for key, net in nets.items()}
        t = compare(fns, repeat=args.repeat, warmup=1)
        print(
            f"{name:20} {t['original'] * 1e3:12.1f} {t['cosine'] / t['original']:6.2f}x {t['floor'] / t['original']:6.2f}x",
            flush=True,
        )
        torch._dynamo.reset()


def layers(args) -> None:
    """Each layer shape's compiled cosine conv against the compiled plain conv. ``read/conv`` is a
    compiled pass that only reads the input once (``x.sum()``), over the conv: what any norm that reads
    the input apart from the convolution costs at least, in the forward pass."""
    print(f"\n{'shape':28} {'pass':8} {'conv ms':>8} {'cos ms':>8} {'cos/conv':>8} {'read/conv':>9}")
    read = torch.compile(lambda x: x.sum(), fullgraph=True)
    for name, (cin, cout, size, k, stride, groups) in SHAPES.items():
        if groups != 1:
            continue  # the ResNet shapes
        x = torch.randn(8, cin, size, size, device=args.device, requires_grad=True)
        w = torch.randn(cout, cin, k, k, device=args.device, requires_grad=True)
        conv = torch.compile(lambda x, w: F.conv2d(x, w, None, stride, k // 2), fullgraph=True)
        cos = torch.compile(lambda x, w: cosine_conv2d(x, w, None, stride, k // 2), fullgraph=True)
        for label in ("fwd", "fwd+bwd"):
            grad = label != "fwd"

            def run(fn, grad=grad):
                with torch.set_grad_enabled(grad):
                    out = fn(x, w)
                    if grad:
                        out.sum().backward()
                sync(args.device)

            fns = {"conv": lambda: run(conv), "cos": lambda: run(cos)}
            if not grad:
                fns["read"] = lambda: run(lambda x, w: read(x))
            t = compare(fns, repeat=args.repeat * 3, warmup=2)
            reads = f"{t['read'] / t['conv']:9.2f}" if "read" in t else f"{'':9}"
            print(
                f"{name:28} {label:8} {t['conv'] * 1e3:8.2f} {t['cos'] * 1e3:8.2f} {t['cos'] / t['conv']:8.2f} {reads}",
                flush=True,
            )
        torch._dynamo.reset()


def across_processes(runs: int, argv: list[str]) -> None:
    """The models' table from ``runs`` fresh processes, each compiling anew: every converted / original
    ratio, and their median."""
    ratios = defaultdict(list)
    for run in range(runs):
        out = subprocess.run([sys.executable, __file__, *argv, "--no-layers"], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        for row in (line.split() for line in out.splitlines()):
            if len(row) == 6 and row[1] in ("inference", "training"):
                ratios[row[0], row[1]].append(float(row[3]) / float(row[2]))
        print(f"run {run + 1}/{runs} done", file=sys.stderr, flush=True)
    print(f"{'model':20} {'pass':9} {'median':>6}  ratio in each process")
    for (model, label), values in ratios.items():
        print(f"{model:20} {label:9} {statistics.median(values):6.3f}  {' '.join(f'{v:.3f}' for v in values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50", "mobilenet_v3_large", "vit_b_16"])
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--passes", nargs="+", choices=["inference", "training"], default=["inference", "training"])
    parser.add_argument("--freezing", action="store_true", help="inductor freezing: weights as constants")
    parser.add_argument("--strip-norms", choices=["fold", "drop"], help="convert with strip_norms (default: kept)")
    parser.add_argument("--floor", action="store_true", help="only the inference floors (see floors())")
    parser.add_argument("--runs", type=int, default=1, help="processes for the models' part (median printed)")
    args = parser.parse_args()
    if args.floor and args.runs > 1:
        parser.error("--floor runs in one process; leave out --runs")
    if args.runs > 1:  # the child's arguments from the parsed ones, so no spelling of --runs reaches it
        argv = ["--device", args.device, "--batch", str(args.batch), "--size", str(args.size),
                "--repeat", str(args.repeat), "--models", *args.models] + ["--freezing"] * args.freezing  # fmt: skip
        argv += ["--strip-norms", args.strip_norms] if args.strip_norms else []
        return across_processes(args.runs, argv + ["--passes", *args.passes])
    torch._inductor.config.freezing = args.freezing
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    backend = "inductor, freezing" if args.freezing else "inductor"
    print(f"torch {torch.__version__}, {device}, {backend}, float32, batch {args.batch}, {args.size}x{args.size}\n")
    if args.floor:
        return floors(args)
    models(args)
    if args.layers:
        layers(args)


if __name__ == "__main__":
    main()
