"""Export and validate the reference models on the GPU execution providers, fp32 and fp16.

    python scripts/gpu_check.py [--out docs/gpu_check.md] [--models resnet18 ...] [--checks onnx torch amp]

Needs a CUDA GPU with onnxruntime-gpu's CUDA (and, if installed, TensorRT) provider.
Writes a Markdown table (and JSON beside it) naming the GPU, with three checks per model:

- ONNX parity on each GPU provider (``cosconvert.validate``), fp32 and fp16 files;
- how many of the file's nodes onnxruntime ran on that provider (the report's ``nodes_on_provider``,
  from its profiler), so a "pass" is known to have run on the GPU and not on the CPU fallback;
- PyTorch itself on CUDA in fp16 and bf16 against the same model in float64 on the CPU.

Then ``cosconvert.reconstruct`` on CUDA with ``amp`` None, bf16 and fp16 (random-weight resnet18),
each block's loss against float32's, and a one-epoch ``finetune``, which autocasts to bf16 on CUDA.
"""

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision

import cosconvert
from cosconvert.onnx.validate import GPU_PROVIDERS, available_providers

CHECKS = ("onnx", "torch", "amp")
MODELS = {"resnet18": 224, "mobilenet_v3_small": 224, "efficientnet_b0": 224, "vit_b_16": 224}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def torch_precision(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """The converted model on CUDA in fp16 and bf16 against float64 on the CPU: max rel error, top-1 %."""
    with torch.no_grad():
        reference = model.double().cpu()(x.double())
        rows = []
        for dtype in (torch.float16, torch.bfloat16):
            out = model.to("cuda", dtype)(x.to("cuda", dtype)).double().cpu()
            rel = ((out - reference).abs().max() / reference.abs().max()).item()
            top1 = (out.argmax(1) == reference.argmax(1)).double().mean().item() * 100
            rows.append({"dtype": str(dtype).removeprefix("torch."), "max_rel": rel, "top1": top1,
                         "finite": bool(out.isfinite().all())})  # fmt: skip
        model.float()
    return rows


def amp_fits(device: str = "cuda") -> list[dict]:
    """reconstruct (random-weight resnet18, 128 images of 64x64, 20 steps per block) with each ``amp``,
    then one epoch of distillation from the original (AMP bf16 on CUDA): per run the seconds, the
    mean of each block's loss after / its target's mean square, the largest relative difference of a
    block's loss from the float32 fit's, and whether every parameter stayed finite float32."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18().eval().to(device)
    images = torch.randn(128, 3, 64, 64)
    rows, full = [], None
    for amp in (None, "bf16", "fp16"):
        model = cosconvert.convert(original, strip_norms="fold").to(device)
        torch.manual_seed(0)
        started = time.perf_counter()
        result = cosconvert.reconstruct(model, original, images, steps=20, amp=amp, device=device)
        seconds = time.perf_counter() - started
        after = [b["loss_after"] for b in result["blocks"]]
        full = full or after
        log = cosconvert.finetune(model, torch.utils.data.TensorDataset(images), teacher=original, epochs=1)
        rows.append({"amp": str(amp), "seconds": seconds,
                     "relative_loss": sum(b["loss_after"] / b["target_power"] for b in result["blocks"]) / len(after),
                     "vs_float32": max(abs(a - f) / f for a, f in zip(after, full)), "finetune_loss": log[-1]["loss"],
                     "finite_float32": all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in model.parameters())})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/gpu_check.md")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--providers", nargs="*", help="default: the GPU providers that load (a dry run: CPU...)")
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS),
                        help="onnx: parity on the GPU providers; torch: PyTorch in fp16 and bf16; amp: reconstruct with "
                             "AMP (only onnx needs onnxruntime-gpu)")  # fmt: skip
    args = parser.parse_args()
    listed = ort.get_available_providers()
    providers = args.providers or [p for p in available_providers("auto") if p != "CPUExecutionProvider"]
    if "onnx" in args.checks and not providers:
        raise SystemExit("no GPU execution provider loads here: run this on a machine with a CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, precision = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models if {"onnx", "torch"} & set(args.checks) else []:
            size = MODELS[name]
            torch.manual_seed(0)
            original = torchvision.models.get_model(name).eval()
            for w in original.parameters():  # vit_b_16's head starts at zero: every output would be 0
                if w.dim() > 1 and not w.any():
                    torch.nn.init.normal_(w, std=0.02)
            model = cosconvert.convert(original, strip_norms="fold").to(device)
            x = torch.randn(1, 3, size, size, device=device)
            inputs = [torch.randn(b, 3, size, size) for b in (1, 8)]
            for fp16 in (False, True) if "onnx" in args.checks else ():
                path = cosconvert.export_onnx(model, x, Path(tmp) / f"{name}-{fp16}.onnx", fp16=fp16)
                reference = model.half() if fp16 else model.float()
                batches = [t.to(device, torch.float16 if fp16 else torch.float32) for t in inputs]
                report = cosconvert.validate(path, reference, batches, providers=providers)
                for r in report.results:
                    rows.append({"model": name, "dtype": report.dtype, "status": report.status, **r.__dict__})
                model.float()
            if device == "cuda" and "torch" in args.checks:
                precision[name] = torch_precision(model, inputs[1])
    fits = amp_fits() if device == "cuda" and "amp" in args.checks else []
    out = Path(args.out)
    absent = [p for p in GPU_PROVIDERS if p in listed and p not in providers]
    lines = [f"# GPU check on {gpu_name()}", "",
             f"torch {torch.__version__}, onnxruntime {ort.__version__}; GPU providers that load: {providers}"
             + (f"; listed but not loading: {absent}" if absent else ""), ""]  # fmt: skip
    if "onnx" in args.checks:
        lines += ["## ONNX parity on the GPU providers (batches 1 and 8, random inputs)", "",
                  "| model | dtype | provider | nodes on it | max abs | max rel | cosine | top-1 % | ms | result |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1f}"
        verdict = r["status"] if r["passed"] else f"FAIL ({r['first_divergence']})"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['provider']} | {r['nodes_on_provider']} | {r['max_abs_error']:.2e} | "
                     f"{r['max_rel_error']:.2e} | {r['cosine']:.6f} | {top1} | {r['latency_ms']:.2f} | {verdict} |")  # fmt: skip
    if precision:
        lines += ["", "## PyTorch on CUDA, reduced precision, against float64 on the CPU (batch 8)", "",
                  "| model | dtype | max rel | top-1 agreement % | finite |", "|---|---|---|---|---|"]  # fmt: skip
    for name, prows in precision.items():
        lines += [f"| {name} | {p['dtype']} | {p['max_rel']:.2e} | {p['top1']:.1f} | {p['finite']} |" for p in prows]
    if fits:
        lines += ["", "## reconstruct with AMP on CUDA, then one epoch of finetune (bf16)", "",
                  "| amp | seconds | mean block loss / target power | largest block loss vs float32's | finetune loss | "
                  "parameters finite float32 |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {f['amp']} | {f['seconds']:.1f} | {f['relative_loss']:.3g} | {f['vs_float32']:.1%} | "
              f"{f['finetune_loss']:.4g} | {f['finite_float32']} |" for f in fits]  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"gpu": gpu_name(), "rows": rows, "torch": precision, "amp": fits}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
