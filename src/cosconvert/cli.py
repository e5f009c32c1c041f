"""The command line: ``cosconvert demo`` runs the whole pipeline on the bundled example.

Exit codes: 0 success, 1 validation failed, 2 bad input (file, arguments), 3 an output
folder that cannot be written, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_VALIDATION, EXIT_INPUT, EXIT_OUTPUT, EXIT_INTERRUPT = 1, 2, 3, 130


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".cosconvert-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise CliError(
            f"cannot write to output folder {path}: {err.strerror}; choose another with --out-dir", EXIT_OUTPUT
        ) from err
    return path


def demo(args: argparse.Namespace) -> int:
    """Digits CNN with BatchNorm -> cosine (norms folded) -> calibrate -> distill -> ONNX -> validate."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import cosconvert
    from cosconvert.data import digits
    from cosconvert.demo import accuracy, train_digits_cnn
    from cosconvert.finetune import finetune

    out = _out_dir(Path(args.out_dir))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say("[1/5] training the example: a BatchNorm CNN on scikit-learn's digits")
    original = train_digits_cnn()
    before = accuracy(original)
    say(f"      original test accuracy {before:.2f}%")
    say("[2/5] converting (cosine layers, normalizers folded) and calibrating")
    train_x = digits("train").tensors[0]
    converted = cosconvert.convert(
        original, strip_norms="fold", centered=args.centered, calibration_data=DataLoader(TensorDataset(train_x), 256)
    )
    calibrated = accuracy(converted)
    say(f"      {converted.cosine_report.summary()}; calibrated accuracy {calibrated:.2f}%")
    say(f"[3/5] distilling from the original for {args.epochs} epochs (no labels)")
    finetune(converted, TensorDataset(train_x), teacher=original, epochs=args.epochs, lr=3e-3, temperature=2.0, progress=not args.quiet,
             checkpoint_dir=out / "checkpoints")  # fmt: skip
    after = accuracy(converted)
    cosconvert.save(converted, out / "converted.pt")
    say("[4/5] exporting to ONNX")
    onnx_path = cosconvert.export_onnx(converted, torch.zeros(1, 1, 8, 8), out / "model.onnx")
    say("[5/5] validating the ONNX file against PyTorch")
    report = cosconvert.validate(onnx_path, converted, [digits("test").tensors[0][:1], digits("test").tensors[0]])
    summary = {
        "accuracy": {"original": round(before, 2), "calibrated": round(calibrated, 2), "distilled": round(after, 2)},
        "conversion": converted.cosine_report.to_dict(),
        "validation": report.to_dict(),
        "files": [str(out / n) for n in ("converted.pt", "model.onnx", "report.json")],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"accuracy: original {before:.2f}%  converted+calibrated {calibrated:.2f}%  distilled {after:.2f}%")
        print(report)
        print("files: " + ", ".join(summary["files"]))
    return 0 if report.passed else EXIT_VALIDATION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cosconvert",
        description="Turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as validated ONNX.",
        epilog="example: cosconvert demo --out-dir out/demo",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the bundled example: digits CNN, converted, distilled, exported, validated")
    d.add_argument("--out-dir", default="cosconvert-demo", help="where to write (default: ./cosconvert-demo)")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--centered", action="store_true", help="Pearson correlation instead of cosine")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        if args.debug:
            raise
        print(f"cosconvert: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("cosconvert: interrupted; rerun to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
