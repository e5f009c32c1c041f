"""The command line: ``cosconvert MODEL [options]`` runs load -> convert -> calibrate ->
fine-tune -> export -> validate; subcommands run each step alone.

Exit codes: 0 success; 1 the ONNX file failed validation; 2 bad input (missing, corrupt or
untrusted file, wrong --arch, weights that don't fit, bad shape or data); 3 the output folder
cannot be written; 4 an unexpected internal error (``--debug`` shows the traceback); 130 interrupted (rerun with --resume to continue fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_VALIDATION, EXIT_INPUT, EXIT_OUTPUT, EXIT_INTERNAL, EXIT_INTERRUPT = 1, 2, 3, 4, 130
COMMANDS = ("run", "convert", "finetune", "export", "validate", "inspect", "demo")

EXAMPLES = """examples:
  cosconvert demo                                       the bundled example, end to end
  cosconvert resnet18.pt --arch torchvision.models:resnet18 --strip-norms fold
  cosconvert net.pt --arch my_net.py:Net --data train.npz --epochs 3 --input-shape 1,3,64,64
  cosconvert inspect resnet18.pt --arch torchvision.models:resnet18
  cosconvert program.pt2 --out-dir out/
"""


class CliError(Exception):
    """One clear line for the user, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


class _Steps:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet

    def __call__(self, text: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"      {text}", file=sys.stderr, flush=True)


def _out_dir(args: argparse.Namespace) -> Path:
    model = Path(args.model) if getattr(args, "model", None) else None
    out = Path(args.out_dir) if args.out_dir else model.with_name(f"{model.stem}-cosine")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CliError(
            f"cannot write to output folder {out} ({err.strerror}); choose another with --out-dir", EXIT_OUTPUT
        ) from err
    return out


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _load(args: argparse.Namespace):
    from cosconvert.load import LoadError, load_model, parse_kwargs

    try:
        return load_model(args.model, args.arch, parse_kwargs(args.arch_kwargs), args.trust_pickle)
    except LoadError as err:
        raise CliError(str(err)) from err


def _input_shape(args, model, example, data=None) -> tuple[int, ...]:
    from cosconvert.load import LoadError, infer_input_shape

    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError as err:
            raise CliError(f"--input-shape {args.input_shape!r} is not a comma-separated list of integers") from err
        if not shape or min(shape) < 1:
            raise CliError(f"--input-shape {args.input_shape!r} must have positive sizes, e.g. 1,3,224,224")
        return shape
    if example:
        return tuple(example[0].shape)
    if data is not None:
        from cosconvert.calibration import batch_inputs

        return (1, *batch_inputs(next(iter(data)))[0].shape[1:])
    try:
        return infer_input_shape(model)
    except LoadError as err:
        raise CliError(str(err)) from err


def _on_device(model, device: str | None):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError) as err:
        raise CliError(
            f"--device {device} is not available here ({str(err).splitlines()[0]}); try --device cpu"
        ) from err


def _check_runs(model, shape) -> None:
    import torch

    try:
        with torch.no_grad():
            model(torch.zeros(shape, device=next(model.parameters()).device))
    except Exception as err:  # noqa: BLE001 - any failure means the shape does not fit the model
        raise CliError(
            f"the model does not run on input shape {shape}: {str(err).splitlines()[0]}; fix --input-shape"
        ) from err


def _data(args):
    """(loader to calibrate and fine-tune on, loader to measure on, what the second is), or Nones without --data."""
    if not args.data:
        return None, None, None
    from cosconvert.data import DataError, held_out_split

    try:
        return held_out_split(args.data, args.batch_size)
    except DataError as err:
        raise CliError(str(err)) from err


def _convert(args, original, data):
    import cosconvert
    from cosconvert.calibration import batch_inputs

    device = next(original.parameters()).device
    calibration = None if data is None else [batch_inputs(b)[0].to(device) for _, b in zip(range(8), data)]
    strip = args.strip_norms if args.strip_norms != "off" else False
    return cosconvert.convert(
        original, centered=args.centered, strip_norms=strip, include=args.include, exclude=args.exclude,
        gain=args.gain, calibration_data=calibration,
    )  # fmt: skip


def cmd_inspect(args) -> int:
    import cosconvert

    original, _ = _load(args)
    strip = args.strip_norms if args.strip_norms != "off" else False
    report = cosconvert.inspect(original, centered=args.centered, strip_norms=strip, include=args.include,
                                exclude=args.exclude, gain=args.gain)  # fmt: skip
    print(report.to_json() if args.json else report)
    return 0


def cmd_run(args, steps=("convert", "finetune", "export", "validate")) -> int:
    import torch

    import cosconvert
    from cosconvert.finetune import evaluate, finetune

    original, example = _load(args)
    original = _on_device(original, args.device)
    data, held_out, evaluated_on = _data(args)
    if "finetune" in steps and args.epochs > 0 and data is None:
        raise CliError(
            f"fine-tuning for --epochs {args.epochs} needs data: give --data (digits, a .npz, an image folder or module:callable)"
        )
    shape = _input_shape(args, original, example, data)
    _check_runs(original, shape)
    out = _out_dir(args)
    todo = ["load"] + [s for s in steps if s != "finetune" or (args.epochs > 0 and data is not None)]
    say = _Steps(len(todo), args.quiet)
    say(f"loaded {args.model} ({sum(p.numel() for p in original.parameters()):,} parameters), input {shape}")
    summary: dict = {"input": str(args.model), "input_shape": list(shape), "files": []}
    recipe = out / "converted.pt"
    if "convert" in steps:
        say("converting" + (" and calibrating" if data is not None else ""))
        converted = _convert(args, original, data)
        report = converted.cosine_report
        say.note(report.summary())
        if report.calibration:
            say.note(f"calibration: {report.calibration['before']} -> {report.calibration['after']}")
    else:
        if not recipe.is_file():
            raise CliError(f"no converted model at {recipe}: run `cosconvert convert` first, or give --out-dir")
        converted = cosconvert.restore(original, recipe)
        report = converted.cosine_report
    summary["conversion"] = report.to_dict()
    if data is not None:
        summary["evaluated_on"] = evaluated_on
        summary["accuracy_original"] = evaluate(original, held_out)
        summary["accuracy_before"] = evaluate(converted, held_out, original)
    if "finetune" in todo:
        say(f"fine-tuning for {args.epochs} epochs" + (" by distillation" if args.distill else " with labels"))
        log = finetune(converted, data, teacher=original if args.distill else None, epochs=args.epochs,
                       lr=args.lr, eval_data=held_out, checkpoint_dir=out / "checkpoints",
                       resume=args.resume, progress=not args.quiet)  # fmt: skip
        summary["finetune"] = log
        summary["accuracy_after"] = evaluate(converted, held_out, original)
        if (out / "checkpoints" / "curves.png").exists():
            summary["files"].append(str(out / "checkpoints" / "curves.png"))
    if "convert" in steps or "finetune" in todo:
        cosconvert.save(converted, recipe)
        summary["files"].append(str(recipe))
    onnx_path = out / "model.onnx"
    if "export" in steps:
        say("exporting to ONNX" + (" (fp16)" if args.fp16 else ""))
        example_input = torch.randn(shape, device=next(converted.parameters()).device)
        cosconvert.export_onnx(converted, example_input, onnx_path, fp16=args.fp16, inline=args.inline)
        summary["files"].append(str(onnx_path))
    passed = True
    if "validate" in steps:
        if not onnx_path.is_file():
            raise CliError(f"no ONNX file at {onnx_path}: run `cosconvert export` first, or give --out-dir")
        say("validating the ONNX file against PyTorch")
        reference = converted.half() if args.fp16 else converted
        if data is not None:  # real inputs make the top-1 agreement mean something
            from cosconvert.calibration import batch_inputs

            real = batch_inputs(next(iter(held_out)))[0]
            batches = [real[:1], real[:3]]
        else:
            batches = [torch.randn(1, *shape[1:]), torch.randn(3, *shape[1:])]
        validation = cosconvert.validate(onnx_path, reference, batches, providers=args.providers)
        summary["validation"] = validation.to_dict()
        passed = validation.passed
        if not args.json:
            print(validation)
    report_path = out / "report.json"
    _write_json(report_path, summary)
    summary["files"].append(str(report_path))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if not passed:
        print(
            "cosconvert: error: the ONNX file does not match PyTorch within tolerance (see the table above)",
            file=sys.stderr,
        )
        return EXIT_VALIDATION
    return 0


def _print_summary(summary: dict) -> None:
    conv = summary["conversion"]
    print(f"layers converted: {len(conv['converted'])}, skipped: {len(conv['skipped'])}, "
          f"normalizers stripped: {len(conv['stripped'])}, fallbacks: {len(conv['fallbacks'])}")  # fmt: skip
    if "evaluated_on" in summary:
        print(f"accuracy measured on {summary['evaluated_on']}")
        print(f"original:           {summary['accuracy_original']}")
    if "accuracy_before" in summary:
        print(f"converted:          {summary['accuracy_before']}")
    if "accuracy_after" in summary:
        print(f"after fine-tuning:  {summary['accuracy_after']}")
    for r in summary.get("validation", {}).get("results", []):
        print(f"ONNX on {r['provider']}: max rel error {r['max_rel_error']:.2e}, {'pass' if r['passed'] else 'FAIL'}")
    print("files written: " + ", ".join(summary["files"]))


def cmd_demo(args) -> int:
    """Digits CNN with BatchNorm -> cosine (norms folded) -> calibrate -> distill -> ONNX -> validate."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import cosconvert
    from cosconvert.data import digits
    from cosconvert.demo import accuracy, train_digits_cnn
    from cosconvert.finetune import finetune

    args.model, args.out_dir = None, args.out_dir or "cosconvert-demo"
    out = _out_dir(args)
    say = _Steps(5, args.quiet)
    say("training the example: a BatchNorm CNN on scikit-learn's digits")
    original = train_digits_cnn()
    before = accuracy(original)
    say.note(f"original test accuracy {before:.2f}%")
    say("converting (cosine layers, normalizers folded) and calibrating")
    train_x = digits("train").tensors[0]
    converted = cosconvert.convert(
        original, strip_norms="fold", centered=args.centered, calibration_data=DataLoader(TensorDataset(train_x), 256)
    )
    calibrated = accuracy(converted)
    say.note(f"{converted.cosine_report.summary()}; calibrated accuracy {calibrated:.2f}%")
    say(f"distilling from the original for {args.epochs} epochs (no labels)")
    finetune(converted, TensorDataset(train_x), teacher=original, epochs=args.epochs, lr=3e-3, temperature=2.0,
             progress=not args.quiet, checkpoint_dir=out / "checkpoints")  # fmt: skip
    after = accuracy(converted)
    cosconvert.save(converted, out / "converted.pt")
    say("exporting to ONNX")
    onnx_path = cosconvert.export_onnx(converted, torch.zeros(1, 1, 8, 8), out / "model.onnx")
    say("validating the ONNX file against PyTorch")
    test_x = digits("test").tensors[0]
    report = cosconvert.validate(onnx_path, converted, [test_x[:1], test_x])
    summary = {
        "accuracy": {"original": round(before, 2), "calibrated": round(calibrated, 2), "distilled": round(after, 2)},
        "conversion": converted.cosine_report.to_dict(),
        "validation": report.to_dict(),
        "files": [str(out / n) for n in ("converted.pt", "model.onnx", "report.json")],
    }
    _write_json(out / "report.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"accuracy: original {before:.2f}%  converted+calibrated {calibrated:.2f}%  distilled {after:.2f}%")
        print(report)
        print("files written: " + ", ".join(summary["files"]))
    return 0 if report.passed else EXIT_VALIDATION


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out-dir", help="where to write (default: MODEL-cosine/ beside MODEL; demo: ./cosconvert-demo)"
    )
    common.add_argument("--quiet", action="store_true", help="no progress output")
    common.add_argument("--json", action="store_true", help="print the summary as JSON")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "model", help="state_dict/checkpoint (.pt, .safetensors), torch.export program (.pt2), or pickled module"
    )
    model.add_argument(
        "--arch", help="module:callable that builds the network, e.g. torchvision.models:resnet18 or net.py:Net"
    )
    model.add_argument("--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'")
    model.add_argument(
        "--trust-pickle", action="store_true", help="allow unpickling a whole nn.Module (runs code: trusted files only)"
    )
    model.add_argument("--centered", action="store_true", help="Pearson correlation instead of cosine")
    model.add_argument(
        "--strip-norms", choices=["off", "drop", "fold"], default="off", help="remove normalizers (default: off)"
    )
    model.add_argument("--include", action="append", help="convert only layers matching this name glob (repeatable)")
    model.add_argument(
        "--exclude", action="append", help="keep layers matching this name glob as they are (repeatable)"
    )
    model.add_argument("--gain", choices=["channel", "scalar", "none"], default="channel")
    model.add_argument(
        "--input-shape", help="example input shape, e.g. 1,3,224,224 (default: from --data, else inferred)"
    )
    model.add_argument("--data", help="digits, a .npz with x (and y), an image folder, or module:callable")
    model.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (default 0: none)")
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--batch-size", type=int, default=64)
    model.add_argument(
        "--distill", action=argparse.BooleanOptionalAction, default=True, help="learn from the original (default)"
    )
    model.add_argument("--resume", action="store_true", help="continue fine-tuning from the last checkpoint")
    model.add_argument(
        "--device", default=None, help="where to convert and train, e.g. cpu or cuda (default: cuda if present)"
    )
    model.add_argument(
        "--providers", default="auto", help="onnxruntime providers (default auto: GPU ones that load, then CPU)"
    )
    model.add_argument("--fp16", action="store_true", help="export in float16")
    model.add_argument("--inline", action="store_true", help="standard ONNX ops only, no local functions")

    parser = argparse.ArgumentParser(
        prog="cosconvert", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as validated ONNX. "
        "`cosconvert MODEL` runs the whole pipeline (the `run` subcommand).",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "run": "the whole pipeline (what `cosconvert MODEL` does)",
        "convert": "convert (and calibrate with --data) and save the recipe",
        "finetune": "restore the saved conversion and fine-tune it (needs --data and --epochs)",
        "export": "restore the saved conversion and export it to ONNX",
        "validate": "check the exported ONNX file against PyTorch",
        "inspect": "print what conversion would do, changing and writing nothing",
    }
    steps = {
        "run": ("convert", "finetune", "export", "validate"), "convert": ("convert",),
        "finetune": ("finetune",), "export": ("export",), "validate": ("validate",),
    }  # fmt: skip
    for name, text in helps.items():
        p = sub.add_parser(name, parents=[common, model], help=text, description=text)
        if name == "inspect":
            p.set_defaults(run=cmd_inspect)
        else:
            p.set_defaults(run=lambda args, s=steps[name]: cmd_run(args, s))
    d = sub.add_parser("demo", parents=[common], help="the bundled example: digits CNN, distilled, exported, validated")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--centered", action="store_true", help="Pearson correlation instead of cosine")
    d.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `cosconvert MODEL ...`
    args = build_parser().parse_args(argv)
    if args.command == "finetune" and args.epochs <= 0:
        args.epochs = 1
    try:
        return args.run(args)
    except CliError as err:
        if args.debug:
            raise
        print(f"cosconvert: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("cosconvert: interrupted; rerun with --resume to continue fine-tuning", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as err:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
        if args.debug:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"cosconvert: internal error: {type(err).__name__}: {first}; rerun with --debug for details",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
