"""Export and validate the reference models on the GPU execution providers, fp32 and fp16.

    python scripts/gpu_check.py [--out docs/gpu_check.md]

Needs a CUDA GPU with onnxruntime-gpu's CUDA (and, if installed, TensorRT) provider.
Writes a Markdown table (and JSON beside it) naming the GPU.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import torchvision

import cosconvert
from cosconvert.onnx.validate import available_providers

MODELS = {"resnet18": 224, "mobilenet_v3_small": 224, "efficientnet_b0": 224, "vit_b_16": 224}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/gpu_check.md")
    args = parser.parse_args()
    providers = [p for p in available_providers("auto") if p != "CPUExecutionProvider"]
    if not providers:
        raise SystemExit("no GPU execution provider loads here: run this on a machine with a CUDA GPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in MODELS.items():
            torch.manual_seed(0)
            model = cosconvert.convert(torchvision.models.get_model(name).eval(), strip_norms="fold").cuda()
            x = torch.randn(1, 3, size, size, device="cuda")
            inputs = [torch.randn(b, 3, size, size) for b in (1, 8)]
            for fp16 in (False, True):
                path = cosconvert.export_onnx(model, x, Path(tmp) / f"{name}-{fp16}.onnx", fp16=fp16)
                reference = model.half() if fp16 else model.float()
                batches = [t.cuda().half() if fp16 else t.cuda() for t in inputs]
                report = cosconvert.validate(path, reference, batches, providers=providers)
                for r in report.results:
                    rows.append({"model": name, "dtype": report.dtype, **r.__dict__})
                model.float()
    out = Path(args.out)
    lines = [f"# GPU check on {gpu_name()}", "", f"torch {torch.__version__}, providers {providers}", "",
             "| model | dtype | provider | max abs | max rel | cosine | top-1 % | ms | result |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1f}"
        verdict = "pass" if r["passed"] else f"FAIL ({r['first_divergence']})"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['provider']} | {r['max_abs_error']:.2e} | "
                     f"{r['max_rel_error']:.2e} | {r['cosine']:.6f} | {top1} | {r['latency_ms']:.2f} | {verdict} |")  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"gpu": gpu_name(), "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
