"""onnxruntime CPU latency of converted networks against the originals, side by side.

    python benchmarks/onnx_latency.py [--repeat 20] [--threads 1 2]

The original is exported with its BatchNorms (onnxruntime folds them into the convs);
the converted one has its norms folded into the cosine layers (strip_norms="fold"). Each session
runs 10 calls in a row and the first is not timed: with the two sessions' calls alternating one by
one, the pool threads of the session just run kept spinning into the other's call (resnet18, two
threads: the original took 13.1 ms so, 8.7 ms alone).
"""

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from _timing import compare

import cosconvert

BLOCK = 10  # calls in a row per session: another session's spinning threads slow the first (see _timing.py)


def session(path: Path, threads: int = 0) -> tuple[ort.InferenceSession, int]:
    """A CPU session with ``threads`` intra-op threads (0: onnxruntime's default, one per core) and the
    node count of the graph onnxruntime runs (after inlining and folding)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    options.log_severity_level = 3  # its warning that the optimized file is machine-specific
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return s, len(onnx.load(options.optimized_model_filepath).graph.node)


def export_pair(name: str, folder: Path, dynamic_batch: bool = True) -> tuple[Path, Path]:
    """torchvision ``name`` (seed 0) exported with its BatchNorms, and its cosine twin with
    ``strip_norms="fold"``, for (N, 3, 224, 224) inputs: the two files."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    example = torch.randn(1, 3, 224, 224)
    plain_path = folder / f"{name}.onnx"
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(model, (example,), plain_path, dynamo=True, dynamic_shapes=dynamic)
    cos_path = cosconvert.export_onnx(
        cosconvert.convert(model, strip_norms="fold"), example, folder / f"{name}-cos.onnx"
    )
    return plain_path, cos_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20, help="timed runs at batch 1 (a tenth, at least 5, at 16)")
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="intra-op threads; 0: one per core")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, float32, 224x224\n")
    print(f"{'model':20} {'threads':>7} {'batch':>5} {'original ms':>12} {'cosine ms':>10} {'ratio':>6}"
          "  nodes run (original, cosine)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["resnet18", "mobilenet_v3_small", "efficientnet_b0"]:
            plain_path, cos_path = export_pair(name, Path(tmp))
            for threads in args.threads:
                (plain, plain_nodes), (cos, cos_nodes) = session(plain_path, threads), session(cos_path, threads)
                for batch in [1, 16]:
                    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
                    feeds = {s: {s.get_inputs()[0].name: x} for s in (plain, cos)}
                    calls = args.repeat if batch == 1 else max(args.repeat // 10, 5)
                    t = compare(
                        {"plain": lambda: plain.run(None, feeds[plain]), "cos": lambda: cos.run(None, feeds[cos])},
                        repeat=max(calls // BLOCK, 2),
                        block=BLOCK,
                    )
                    print(
                        f"{name:20} {threads or 'all':>7} {batch:5} {t['plain'] * 1e3:12.2f} {t['cos'] * 1e3:10.2f}"
                        f" {t['cos'] / t['plain']:6.2f}  {plain_nodes}, {cos_nodes}"
                    )


if __name__ == "__main__":
    main()
