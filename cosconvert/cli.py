"""The command line: ``cosconvert MODEL [options]`` runs load -> convert -> calibrate ->
fine-tune -> export -> validate; subcommands run each step alone, each with its own options.

Exit codes: 0 success; 1 the ONNX file failed validation (it differs from the converted PyTorch
model); 2 bad input (missing, corrupt, text or untrusted file, wrong --arch, weights that don't
fit, bad shape or data, a model the exporter cannot take as asked); 3 the output folder cannot be
written; 4 an unexpected internal error; 5 validation inconclusive (the outputs are degenerate:
constant, zero, non-finite or the same for different inputs, so they cannot show the file is
right); 130 interrupted (rerun with --resume to continue fine-tuning). ``--debug`` adds the
traceback and changes no exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from cosconvert.atomic import atomic_write

EXIT_VALIDATION, EXIT_INPUT, EXIT_OUTPUT, EXIT_INTERNAL, EXIT_INCONCLUSIVE, EXIT_INTERRUPT = 1, 2, 3, 4, 5, 130
COMMANDS = ("run", "convert", "finetune", "export", "validate", "inspect", "demo")
VALIDATION_BATCHES = (1, 8)  # batch sizes validation feeds (a dynamic batch is checked at two sizes)

EXAMPLES = """examples:
  cosconvert demo                                       the bundled example, end to end
  cosconvert resnet18.pt --arch torchvision:resnet18 --strip-norms fold
  cosconvert convnext.pt --arch timm:convnext_atto
  cosconvert net.pt --arch my_net.py:Net --data train.npz --epochs 3 --input-shape 2,3,64,64
  cosconvert inspect resnet18.pt --arch torchvision:resnet18
  cosconvert validate resnet18-cosine/model.onnx
  cosconvert program.pt2 --out-dir out/

exit codes: 0 ok, 1 validation failed, 2 bad input, 3 output folder not writable, 4 internal error,
5 validation inconclusive, 130 interrupted (rerun with --resume)
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


def _out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CliError(
            f"cannot write to output folder {path} ({err.strerror}); choose another with --out-dir", EXIT_OUTPUT
        ) from err
    return path


def _write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _load(model: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool):
    from cosconvert.load import LoadError, load_model, parse_kwargs

    try:
        return load_model(model, arch, parse_kwargs(arch_kwargs), trust_pickle)
    except LoadError as err:
        raise CliError(str(err)) from err


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as err:
        raise CliError(f"--input-shape {text!r} is not a comma-separated list of integers") from err
    if not shape or min(shape) < 1:
        raise CliError(f"--input-shape {text!r} must have positive sizes, e.g. 2,3,224,224")
    return shape


def _input_shape(args, model, example, data=None) -> tuple[int, ...]:
    """--input-shape as given; else the .pt2 program's example, the data's, or a guess (batch 2)."""
    from cosconvert.load import EXAMPLE_BATCH, LoadError, infer_input_shape

    if args.input_shape:
        return _parse_shape(args.input_shape)
    if example:
        return tuple(example[0].shape)
    if data is not None:
        from cosconvert.data import batch_inputs

        return (EXAMPLE_BATCH, *batch_inputs(next(iter(data)))[0].shape[1:])
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


def _device_of(model):
    import torch

    return next(model.parameters(), torch.empty(0)).device


def _check_runs(model, shape) -> None:
    import torch

    try:
        with torch.no_grad(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # fx prints code
            model(torch.zeros(shape, device=_device_of(model)))
    except Exception as err:  # noqa: BLE001 - any failure means the shape does not fit the model
        raise CliError(
            f"the model does not run on input shape {shape}: {str(err).splitlines()[0]}; fix --input-shape"
        ) from err


def _batch_sizes(model, shape) -> tuple[int, ...]:
    """VALIDATION_BATCHES where the model runs at any batch size, else only the batch it was given."""
    try:
        _check_runs(model, (max(VALIDATION_BATCHES), *shape[1:]))
    except CliError:
        return (shape[0],)
    return VALIDATION_BATCHES


def _data(args):
    """(loader to calibrate and fine-tune on, loader to measure on, what the second is), or Nones without data.
    Images are sized to --input-shape's last axis (else 224) and normalized by --image-norm."""
    spec = getattr(args, "data", None)
    if not spec:
        return None, None, None
    from cosconvert.data import DataError, held_out_split

    size = _parse_shape(args.input_shape)[-1] if getattr(args, "input_shape", None) else 224
    norm = _image_norm(getattr(args, "image_norm", None))
    try:
        return held_out_split(spec, getattr(args, "batch_size", 64), image_size=size, image_norm=norm)
    except DataError as err:
        raise CliError(str(err)) from err


def _image_norm(text: str | None) -> tuple | None:
    """--image-norm "MEAN,STD" (or three means, then three deviations) as Normalize's (mean, std)."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6) or any(v <= 0 for v in values[len(values) // 2 :]):
        raise CliError(f"--image-norm {text!r}: give MEAN,STD (e.g. 0.5,0.5) or three means then three positive deviations")
    half = len(values) // 2
    return (values[:half] * (3 // half), values[half:] * (3 // half))


@dataclass
class Run:
    """What the pipeline's steps share: the arguments, the models, the data, and what was written."""

    args: argparse.Namespace
    out: Path
    say: _Steps
    original: object
    shape: tuple
    data: object = None
    held_out: object = None
    evaluated_on: str = ""
    converted: object = None
    onnx_path: Path | None = None
    summary: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    reference: Path | None = None  # the converted.pt to restore, when not the output folder's
    batch_sizes: tuple = VALIDATION_BATCHES  # what fidelity and parity are measured at

    @property
    def recipe(self) -> Path:
        return self.reference or self.out / "converted.pt"

    def wrote(self, *paths: Path) -> None:
        for p in paths:
            if str(p) not in self.files:
                self.files.append(str(p))


def _source_metadata(args, shape) -> dict:
    """What the ONNX file records about its source, so `cosconvert validate FILE.onnx` can rebuild it."""
    from cosconvert.onnx.export import file_sha256

    arch = args.arch or ""
    module, sep, attr = arch.rpartition(":")
    if sep and module.endswith(".py"):
        arch = f"{Path(module).resolve()}:{attr}"
    return {
        "source": str(Path(args.model).resolve()), "source_sha256": file_sha256(args.model), "arch": arch,
        "arch_kwargs": args.arch_kwargs or "", "input_shape": json.dumps(list(shape)),
    }  # fmt: skip


def _example_batches(run: Run) -> list:
    """Inputs to measure fidelity and parity on: held-out data, else seeded random example inputs."""
    import torch

    if run.held_out is not None:
        from cosconvert.data import batch_inputs

        real = batch_inputs(next(iter(run.held_out)))[0]
        return [real[:b] for b in run.batch_sizes]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, *run.shape[1:], generator=g) for b in run.batch_sizes]


def step_start(args, steps: tuple[str, ...]) -> Run:
    """Load the model and the data, settle the input shape and the output folder."""
    original, example = _load(args.model, args.arch, args.arch_kwargs, args.trust_pickle)
    original = _on_device(original, args.device)
    data, held_out, evaluated_on = _data(args)
    if "finetune" in steps and data is None:
        raise CliError(
            f"fine-tuning for --epochs {args.epochs} needs data: give --data (digits, a .npz, an image folder or module:callable)"
        )
    shape = _input_shape(args, original, example, data)
    _check_runs(original, shape)
    model = Path(args.model)
    out = _out_dir(Path(args.out_dir) if args.out_dir else model.with_name(f"{model.stem}-cosine"))
    say = _Steps(1 + len(steps), args.quiet)
    say(f"loaded {args.model} ({sum(p.numel() for p in original.parameters()):,} parameters), input {shape}")
    run = Run(args, out, say, original, shape, data, held_out, evaluated_on, batch_sizes=_batch_sizes(original, shape))
    run.evaluated_on = evaluated_on or f"random example inputs of shape {(run.batch_sizes[-1], *shape[1:])}"
    run.summary = {"input": str(args.model), "input_shape": list(shape), "evaluated_on": run.evaluated_on}
    return run


def _measure(run: Run, key: str) -> None:
    """Accuracy on the held-out data (with --data), and fidelity to the original, into the summary."""
    from cosconvert.finetune import evaluate
    from cosconvert.onnx.validate import fidelity

    if run.held_out is not None:
        if "accuracy_original" not in run.summary:
            run.summary["accuracy_original"] = evaluate(run.original, run.held_out)
        run.summary[f"accuracy_{key}"] = evaluate(run.converted, run.held_out, run.original)
    result = fidelity(run.converted, run.original, _example_batches(run))
    run.summary[f"fidelity_{key}"] = result
    top1 = "" if result["top1_agreement"] is None else f", top-1 agreement {result['top1_agreement']:.1f}%"
    run.say.note(f"fidelity to the original: output cosine {result['cosine']:.4f}{top1}")


def step_convert(run: Run) -> None:
    """Convert (and calibrate on the data), then save the recipe."""
    import cosconvert
    from cosconvert.calibration import summary as calibration_summary
    from cosconvert.data import batch_inputs

    args = run.args
    blocks = [b.strip() for b in args.reconstruct_blocks.split(",")] if args.reconstruct_blocks else "auto"
    reconstructing = args.reconstruct or blocks != "auto"  # --reconstruct-blocks implies --reconstruct
    if reconstructing and run.data is None:
        raise CliError("--reconstruct needs --data (inputs to reconstruct on; labels are not needed)")
    run.say("converting" + (" and calibrating" if run.data is not None else ""))
    device = _device_of(run.original)
    calibration = None if run.data is None else [batch_inputs(b)[0].to(device) for _, b in zip(range(8), run.data)]
    run.converted = cosconvert.convert(
        run.original, centered=args.centered, strip_norms=False if args.strip_norms == "off" else args.strip_norms,
        include=args.include, exclude=args.exclude, gain=args.gain,
        example_inputs=None if calibration is None else calibration[0],
    )  # fmt: skip
    report = run.converted.cosine_report
    run.say.note(report.summary())
    stage = "converted"
    _measure(run, stage)
    if calibration is not None:
        run.say.note(calibration_summary(cosconvert.calibrate(run.converted, run.original, calibration)))
        stage = "calibrated"
        _measure(run, stage)
    if reconstructing:
        run.say.note("reconstructing block by block")
        try:
            cosconvert.reconstruct(run.converted, run.original, run.data, blocks=blocks, amp=_amp(args),
                                   verbose=not args.quiet)  # fmt: skip
        except ValueError as err:
            if blocks == "auto":
                raise
            raise CliError(f"--reconstruct-blocks: {err}") from err
        stage = "reconstructed"
        _measure(run, stage)
    for kind in ("accuracy", "fidelity"):  # "before": the model as fine-tuning gets it
        if f"{kind}_{stage}" in run.summary:
            run.summary[f"{kind}_before"] = run.summary[f"{kind}_{stage}"]
    cosconvert.save(run.converted, run.recipe)
    run.wrote(run.recipe)


def step_restore(run: Run) -> None:
    """The saved conversion (converted.pt in the output folder), for the steps that start from it."""
    import cosconvert

    if not run.recipe.is_file():
        raise CliError(f"no converted model at {run.recipe}: run `cosconvert convert` first, or give --out-dir")
    try:
        run.converted = cosconvert.restore(run.original, run.recipe)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CliError(f"{run.recipe} does not restore onto this model ({str(err).splitlines()[0]})") from err


def _amp(args) -> str | None:
    return None if args.amp == "none" else args.amp


def step_finetune(run: Run) -> None:
    """Fine-tune (by distillation unless --no-distill), checkpointing into checkpoints/; save the result."""
    import cosconvert
    from cosconvert.finetune import finetune

    args = run.args
    run.say(f"fine-tuning for {args.epochs} epochs" + (" by distillation" if args.distill else " with labels"))
    folder = run.out / "checkpoints"
    log = finetune(run.converted, run.data, teacher=run.original if args.distill else None, epochs=args.epochs,
                   lr=args.lr, eval_data=run.held_out, checkpoint_dir=folder, checkpoint_every=50,
                   resume=args.resume, amp=_amp(args), verbose=not args.quiet)  # fmt: skip
    run.summary["finetune"] = log
    run.wrote(*sorted(p for p in folder.iterdir() if not p.name.startswith(".")))
    _measure(run, "after")
    cosconvert.save(run.converted, run.recipe)
    run.wrote(run.recipe)


def step_export(run: Run) -> None:
    """Export to model.onnx: dynamic batch unless --static-batch; the file's metadata names its source."""
    import torch

    import cosconvert
    from cosconvert.onnx.export import ExportError

    args = run.args
    run.say("exporting to ONNX" + (" (fp16)" if args.fp16 else ""))
    run.onnx_path = run.out / "model.onnx"
    example = torch.randn(run.shape, generator=torch.Generator().manual_seed(0)).to(_device_of(run.converted))
    try:
        cosconvert.export_onnx(run.converted, example, run.onnx_path, fp16=args.fp16, inline=args.inline,
                               dynamic_batch=not args.static_batch, metadata=_source_metadata(args, run.shape))  # fmt: skip
    except ExportError as err:
        raise CliError(str(err)) from err
    run.wrote(run.onnx_path)
    if run.onnx_path.with_name(run.onnx_path.name + ".data").exists():
        run.wrote(run.onnx_path.with_name(run.onnx_path.name + ".data"))


def step_validate(run: Run) -> int:
    """Fidelity to the original and ONNX parity, printed; returns the exit code the verdict calls for."""
    import cosconvert

    onnx_path = run.onnx_path or run.out / "model.onnx"
    if not onnx_path.is_file():
        raise CliError(f"no ONNX file at {onnx_path}: run `cosconvert export` first, or give --out-dir")
    run.say("validating: fidelity to the original, and the ONNX file against PyTorch")
    fp16 = _file_dtype(onnx_path) == "float16"
    reference = run.converted.half() if fp16 else run.converted
    report = cosconvert.validate(onnx_path, reference, _example_batches(run), original=run.original,
                                 inputs_name=run.evaluated_on, providers=run.args.providers)  # fmt: skip
    run.summary["validation"] = report.to_dict()
    if not run.args.json:
        print(report)
    return {"pass": 0, "fail": EXIT_VALIDATION, "inconclusive": EXIT_INCONCLUSIVE}[report.status]


def _file_dtype(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return "float16" if proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"


def step_finish(run: Run, code: int) -> int:
    """Write report.json (listing every file written, itself included), print the summary, say why it failed."""
    report_path = run.out / "report.json"
    run.wrote(report_path)
    if run.converted is not None:
        run.summary["conversion"] = run.converted.cosine_report.to_dict()
    run.summary["files"] = run.files
    _write_json(report_path, run.summary)
    if run.args.json:
        print(json.dumps(run.summary, indent=2))
    else:
        _print_summary(run.summary)
    _say_verdict(run.summary.get("validation", {}), code)
    return code


def _say_verdict(validation: dict, code: int) -> None:
    if code == EXIT_VALIDATION:
        print("cosconvert: error: the ONNX file does not match PyTorch within tolerance (see the table above)",
              file=sys.stderr)  # fmt: skip
    elif code == EXIT_INCONCLUSIVE:
        print(f"cosconvert: validation inconclusive: {'; '.join(validation['inconclusive'])}; these outputs cannot "
              "show whether the file is right: validate on real inputs (--data) or fix the model", file=sys.stderr)  # fmt: skip


def _print_summary(summary: dict) -> None:
    conv = summary.get("conversion")
    if conv:
        print(f"layers converted: {len(conv['converted'])}, skipped: {len(conv['skipped'])}, "
              f"normalizers stripped: {len(conv['stripped'])}, fallbacks: {len(conv['fallbacks'])}")  # fmt: skip
    print(f"measured on {summary['evaluated_on']}")
    stages = [("original", "original"), ("converted", "converted"), ("calibrated", "calibrated"),
              ("reconstructed", "reconstructed"), ("after", "after fine-tuning")]  # fmt: skip
    if "fidelity_converted" not in summary:  # a report.json of an older run: one figure before fine-tuning
        stages[1] = ("before", "converted")
    for key, words in stages:
        if f"accuracy_{key}" in summary:
            print(f"{words + ':':19} {summary[f'accuracy_{key}']}")
        if f"fidelity_{key}" in summary:
            f = summary[f"fidelity_{key}"]
            top1 = "-" if f["top1_agreement"] is None else f"{f['top1_agreement']:.1f}%"
            print(f"fidelity, {words + ':':18} output cosine {f['cosine']:.4f}, top-1 agreement {top1}")
    print("files written: " + ", ".join(summary["files"]))


def cmd_pipeline(args, steps: tuple[str, ...]) -> int:
    """``run`` and the one-step subcommands: each step in order, then report.json."""
    if "finetune" in steps and args.command == "run" and args.epochs <= 0:
        steps = tuple(s for s in steps if s != "finetune")
    run = step_start(args, steps)
    if "convert" in steps:
        step_convert(run)
    else:
        step_restore(run)
    if "finetune" in steps:
        step_finetune(run)
    if "export" in steps:
        step_export(run)
    code = step_validate(run) if "validate" in steps else 0
    return step_finish(run, code)


def _onnx_metadata(path: Path) -> dict:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - anything unreadable is bad input
        raise CliError(f"{path} is not a readable ONNX file ({type(err).__name__})") from err
    return {p.key: p.value for p in proto.metadata_props}


def cmd_validate(args) -> int:
    """``cosconvert validate FILE.onnx``: against the converted.pt beside it (or --reference), rebuilt
    onto the source model the file names (or --model)."""
    from cosconvert.onnx.export import file_sha256

    path = Path(args.onnx)
    if not path.is_file():
        raise CliError(f"ONNX file {path} not found")
    meta = _onnx_metadata(path)
    model = args.model or meta.get("source")
    if not model:
        raise CliError(f"{path} does not name the model it was converted from: give it with --model (and --arch)")
    if not Path(model).is_file():
        raise CliError(f"the source model {model} named in {path} is not there: give it with --model")
    if not args.model and meta.get("source_sha256") and file_sha256(model) != meta["source_sha256"]:
        raise CliError(f"{model} has changed since {path} was exported (SHA-256 differs): give the source with --model")
    args.model = model
    args.arch = args.arch or meta.get("arch") or None
    args.arch_kwargs = args.arch_kwargs or meta.get("arch_kwargs") or None
    if not args.input_shape and meta.get("input_shape"):
        args.input_shape = ",".join(map(str, json.loads(meta["input_shape"])))
    args.out_dir = args.out_dir or str(path.parent)
    run = step_start(args, ("validate",))
    run.onnx_path = path
    run.reference = Path(args.reference) if args.reference else path.with_name("converted.pt")
    if not run.reference.is_file():
        raise CliError(
            f"no converted model at {run.reference}: give the converted.pt {path.name} came from with --reference"
        )
    step_restore(run)
    return step_finish(run, step_validate(run))


def cmd_inspect(args) -> int:
    import torch

    import cosconvert

    original, example = _load(args.model, args.arch, args.arch_kwargs, args.trust_pickle)
    inputs = (torch.randn(_parse_shape(args.input_shape)),) if args.input_shape else example or None
    report = cosconvert.inspect(original, centered=args.centered, include=args.include, exclude=args.exclude,
                                strip_norms=False if args.strip_norms == "off" else args.strip_norms, gain=args.gain,
                                example_inputs=inputs)  # fmt: skip
    print(report.to_json() if args.json else report)
    return 0


def cmd_demo(args) -> int:
    """Digits CNN with BatchNorm -> cosine (norms folded) -> calibrate -> distill -> ONNX -> validate."""
    from torch.utils.data import DataLoader, TensorDataset

    import cosconvert
    from cosconvert.data import digits
    from cosconvert.demo import accuracy, train_digits_cnn

    out = _out_dir(Path(args.out_dir))
    say = _Steps(5, args.quiet)
    say("training the example: a BatchNorm CNN on scikit-learn's digits")
    original = train_digits_cnn()
    before = accuracy(original)
    say.note(f"original test accuracy {before:.2f}%")
    say("converting (cosine layers, normalizers folded) and calibrating")
    train_x, (test_x, test_y) = digits("train").tensors[0], digits("test").tensors
    converted = cosconvert.convert(
        original, strip_norms="fold", centered=args.centered, calibration_data=DataLoader(TensorDataset(train_x), 256)
    )
    calibrated = accuracy(converted)
    say.note(f"{converted.cosine_report.summary()}; calibrated accuracy {calibrated:.2f}%")
    say(f"distilling from the original for {args.epochs} epochs (no labels)")
    cosconvert.finetune(converted, TensorDataset(train_x), teacher=original, epochs=args.epochs, lr=3e-3,
                        temperature=2.0, verbose=not args.quiet, checkpoint_dir=out / "checkpoints",
                        eval_data=DataLoader(TensorDataset(test_x, test_y), 256))  # fmt: skip
    after = accuracy(converted)
    cosconvert.save(converted, out / "converted.pt")
    say("exporting to ONNX")
    onnx_path = cosconvert.export_onnx(converted, test_x[:2], out / "model.onnx",
                                       metadata={"source": "cosconvert demo: DigitsCNN trained on digits"})  # fmt: skip
    say("validating: fidelity to the original, and the ONNX file against PyTorch")
    evaluated_on = f"digits test split ({len(test_x)} samples)"
    report = cosconvert.validate(
        onnx_path, converted, [test_x[:1], test_x], original=original, inputs_name=evaluated_on
    )
    files = sorted(str(p) for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    summary = {
        "evaluated_on": evaluated_on,
        "accuracy": {"original": round(before, 2), "calibrated": round(calibrated, 2), "distilled": round(after, 2)},
        "conversion": converted.cosine_report.to_dict(),
        "validation": report.to_dict(),
        "files": files + [str(out / n) for n in ("converted.pt", "model.onnx", "report.json")],
    }
    _write_json(out / "report.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"accuracy on {evaluated_on}: original {before:.2f}%  converted+calibrated {calibrated:.2f}%  "
              f"distilled {after:.2f}%")  # fmt: skip
        print(report)
        print("files written: " + ", ".join(summary["files"]))
    code = {"pass": 0, "fail": EXIT_VALIDATION, "inconclusive": EXIT_INCONCLUSIVE}[report.status]
    _say_verdict(summary["validation"], code)
    return code


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default is not argparse.SUPPRESS and "default" not in text:
            d = action.default
            shown = "none" if d is None else ("on" if d else "off") if isinstance(d, bool) else d
            text += f" (default: {shown})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, with where to look."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"cosconvert: error: {message} (see `{self.prog} --help`)\n")


def _add_source(p: argparse.ArgumentParser, positional: bool = True) -> None:
    g = p.add_argument_group("the model")
    if positional:
        g.add_argument(
            "model", help="state_dict/checkpoint (.pt, .safetensors), torch.export program (.pt2), or pickled module"
        )
    g.add_argument("--arch", help="what builds the network for a state_dict: timm:NAME, torchvision:NAME, "
                   "transformers:CLASS (config fields from --arch-kwargs), module:callable or file.py:Class")  # fmt: skip
    g.add_argument(
        "--arch-kwargs", help="JSON keyword arguments (or config fields) for --arch, e.g. '{\"num_classes\": 10}'"
    )
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole nn.Module (runs code: trusted files only)")  # fmt: skip


def _add_conversion(p: argparse.ArgumentParser, reconstruct: bool = False) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--centered", action="store_true", help="Pearson correlation instead of cosine")
    g.add_argument("--strip-norms", choices=["off", "drop", "fold"], default="off",
                   help="remove normalizers after cosine layers: drop them, or fold their scale and shift in")  # fmt: skip
    g.add_argument("--include", action="append", help="convert only layers matching this name glob (repeatable)")
    g.add_argument("--exclude", action="append", help="keep layers matching this name glob as they are (repeatable)")
    g.add_argument("--gain", choices=["channel", "scalar", "none"], default="channel",
                   help="learned output scale of each cosine layer: per channel, one per layer, or none")  # fmt: skip
    if reconstruct:
        g.add_argument("--reconstruct", action="store_true", help="after calibrating, train each block to give the "
                       "original's activations on up to 512 inputs of --data (no labels needed)")  # fmt: skip
        g.add_argument("--reconstruct-blocks", metavar="NAMES", help="reconstruct these blocks, comma-separated "
                       "module names of the original (e.g. conv1,layer1,layer2,layer3,layer4,fc), instead of the "
                       "residual blocks and transformer layers it finds; implies --reconstruct")  # fmt: skip


def _add_inputs(p: argparse.ArgumentParser, data: bool = True) -> None:
    g = p.add_argument_group("inputs")
    g.add_argument("--input-shape", help="example input shape, batch first (default: the .pt2's example, else "
                   "from --data, else guessed from the first layer, with a batch of 2)")  # fmt: skip
    if data:
        g.add_argument("--data", help="data to calibrate, fine-tune and measure on: digits, a .npz with x (and y), "
                       "an image folder (class subfolders, or unlabeled images), or module:callable")  # fmt: skip
        g.add_argument("--batch-size", type=int, default=64, help="batch size for --data")
        g.add_argument("--image-norm", metavar="MEAN,STD", help="for an image folder: pixels in 0..1 become "
                       "(x - MEAN) / STD, per channel with six values (EfficientNet-Lite: 0.498,0.502)")  # fmt: skip
    g.add_argument("--device", help="where to run PyTorch, e.g. cpu or cuda (default: cuda if present)")


def _add_finetune(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=epochs, help="fine-tuning epochs (0: none)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW, cosine schedule)")
    g.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="learn from the original's outputs (plus labels where the data has them)")  # fmt: skip
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT_DIR/checkpoints")


def _add_export(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--fp16", action="store_true", help="export in float16 (norms still in float32)")
    g.add_argument("--inline", action="store_true", help="standard ONNX ops only, no model-local functions")
    g.add_argument("--static-batch", action="store_true",
                   help="fix the batch size to --input-shape's (for models whose batch cannot be dynamic)")  # fmt: skip


def _add_validation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--providers", default="auto",
                   help="onnxruntime providers to check on, comma-separated; each must run the file, "
                        "else validation fails; auto: the GPU ones that load, then CPU")  # fmt: skip


def _add_output(p: argparse.ArgumentParser, out_default: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", help=f"where to write (default: {out_default})")
    g.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    g.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    g.add_argument("--debug", action="store_true", help="add the traceback to errors (the exit code stays the same)")


BESIDE = "MODEL-cosine/ beside MODEL"
SUBCOMMANDS = {
    "run": ("the whole pipeline (what `cosconvert MODEL` does)", ("convert", "finetune", "export", "validate")),
    "convert": ("convert (and calibrate with --data) and save converted.pt", ("convert",)),
    "finetune": ("restore the saved conversion and fine-tune it (needs --data)", ("finetune",)),
    "export": ("restore the saved conversion and export it to model.onnx", ("export",)),
}


def build_parser() -> argparse.ArgumentParser:
    from cosconvert import __version__

    parser = _Parser(
        prog="cosconvert", formatter_class=_Formatter, epilog=EXAMPLES,
        description="Turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as validated ONNX. "
        "`cosconvert MODEL` runs the whole pipeline (the `run` subcommand).",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"cosconvert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    for name, (text, steps) in SUBCOMMANDS.items():
        p = add(name, text)
        _add_source(p)
        if "convert" in steps:
            _add_conversion(p, reconstruct=True)
        _add_inputs(p, data=name != "export")
        if "convert" in steps or "finetune" in steps:
            p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                           help="mixed precision of --reconstruct and fine-tuning: auto is bf16 on CUDA, float32 "
                                "elsewhere; none is float32")  # fmt: skip
        if "finetune" in steps:
            _add_finetune(p, epochs=0 if name == "run" else 1)
        if "export" in steps:
            _add_export(p)
        if "validate" in steps:
            _add_validation(p)
        _add_output(p, BESIDE)
        p.set_defaults(run=lambda args, s=steps: cmd_pipeline(args, s))

    v = add("validate", "check FILE.onnx: its fidelity to the original, and parity with the converted PyTorch model")
    v.add_argument("onnx", help="the exported file; its metadata names the source model, arch and input shape")
    v.add_argument("--reference", help="the converted.pt it was exported from (default: converted.pt beside FILE)")
    v.add_argument("--model", help="the original model file (default: the source named in FILE's metadata)")
    _add_source(v, positional=False)
    _add_inputs(v)
    _add_validation(v)
    _add_output(v, "FILE's folder (report.json)")
    v.set_defaults(run=cmd_validate)

    i = add("inspect", "print what conversion would do, changing and writing nothing")
    _add_source(i)
    _add_conversion(i)
    i.add_argument("--input-shape", help="example input shape, batch first, on which the conversion is checked "
                   "(default: the .pt2's example, else guessed from the first layer)")  # fmt: skip
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--debug", action="store_true", help="add the traceback to errors (the exit code stays the same)")
    i.set_defaults(run=cmd_inspect)

    d = add("demo", "the bundled example: digits CNN, distilled, exported, validated")
    d.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    d.add_argument("--centered", action="store_true", help="Pearson correlation instead of cosine")
    _add_output(d, "./cosconvert-demo")
    d.set_defaults(run=cmd_demo, out_dir=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # `cosconvert MODEL ...`
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        args.out_dir = args.out_dir or "cosconvert-demo"
    try:
        return args.run(args)
    except CliError as err:
        return _fail(args, f"cosconvert: error: {err}", err.code)
    except KeyboardInterrupt:
        return _fail(args, "cosconvert: interrupted; rerun with --resume to continue fine-tuning", EXIT_INTERRUPT)
    except Exception as err:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return _fail(args, f"cosconvert: internal error: {type(err).__name__}: {first}; rerun with --debug for details",
                     EXIT_INTERNAL)  # fmt: skip


def _fail(args, line: str, code: int) -> int:
    """The one line on stderr (after the traceback, with --debug), and the exit code: the same either way."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
