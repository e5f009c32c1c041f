"""Where onnxruntime spends a converted network's time: kernel milliseconds per op type, original beside converted.

    python benchmarks/onnx_profile.py [--model resnet18] [--threads 1 2] [--runs 25]

Both networks are exported as in onnx_latency.py (the original with its BatchNorms, the converted one
with strip_norms="fold"), run at batch 1, 224x224, on CPUExecutionProvider with onnxruntime's profiler on.
Prints, per intra-op thread count, the fastest wall-clock of 20 unprofiled runs and the profiled kernel
time per run summed by op type.
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _timing import compare
from onnx_latency import export_pair


def kernel_ms(path: Path, threads: int, runs: int, x: np.ndarray) -> tuple[float, dict[str, float]]:
    """Fastest wall-clock ms of 20 runs, and profiled kernel ms per run by op type (largest first)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    wall = compare({"run": lambda: session.run(None, feed)}, repeat=20)["run"] * 1e3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_type: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_type[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return wall, dict(sorted(by_type.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=25, help="profiled runs")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    print(f"onnxruntime {ort.__version__}, {args.model}, batch 1, kernel ms per run by op type\n")
    with tempfile.TemporaryDirectory() as tmp:
        plain_path, cos_path = export_pair(args.model, Path(tmp), dynamic_batch=False)
        for threads in args.threads:
            plain_wall, plain = kernel_ms(plain_path, threads, args.runs, x)
            cos_wall, cos = kernel_ms(cos_path, threads, args.runs, x)
            print(f"{threads} thread(s): wall {plain_wall:.2f} ms original, {cos_wall:.2f} ms converted, "
                  f"ratio {cos_wall / plain_wall:.2f}")  # fmt: skip
            for name, table in (("original", plain), ("converted", cos)):
                kernels = ", ".join(f"{op} {ms:.2f}" for op, ms in table.items() if ms >= 0.05)
                print(f"  {name:9} kernels {sum(table.values()):6.2f}: {kernels}")
            print()


if __name__ == "__main__":
    main()
