"""The command line: ``cosconvert MODEL [options]`` runs load -> convert -> calibrate ->
fine-tune -> export -> validate; subcommands run each step alone, each with its own options.

Exit codes: 0 success; 1 the ONNX file failed validation (it differs from the converted PyTorch
model); 2 bad input (missing, corrupt, text or untrusted file, wrong --arch, weights that don't
fit, bad shape or data, a model the exporter cannot take as asked); 3 the output folder cannot be
written; 4 an unexpected internal error; 5 validation inconclusive (the outputs are degenerate:
constant, zero, non-finite or the same for different inputs, so they cannot show the file is
right); 130 interrupted (during fine-tuning: rerun with --resume to continue it). ``--debug`` adds the
traceback and changes no exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from cosconvert.errors import BAD_INPUT as EXIT_INPUT
from cosconvert.errors import INCONCLUSIVE as EXIT_INCONCLUSIVE
from cosconvert.errors import INTERNAL as EXIT_INTERNAL
from cosconvert.errors import INTERRUPTED as EXIT_INTERRUPT
from cosconvert.errors import VALIDATION_FAILED as EXIT_VALIDATION
from cosconvert.errors import CosconvertError, InputError, Interrupted, first_line

if TYPE_CHECKING:  # the pipeline loads torch: imported where a command runs, so --version answers at once
    from cosconvert.pipeline import Pipeline, RunReport, RunSettings

COMMANDS = ("run", "convert", "finetune", "export", "validate", "inspect", "demo")

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


class CliError(InputError):
    """Bad input met while reading the command line's arguments (exit code 2)."""


def _load(model: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool):
    from cosconvert.load import load_model, parse_kwargs

    return load_model(model, arch, parse_kwargs(arch_kwargs), trust_pickle)


def _image_norm(text: str | None) -> tuple | None:
    """--image-norm "MEAN,STD" (or three means, then three deviations) as Normalize's (mean, std)."""
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6) or any(v <= 0 for v in values[len(values) // 2 :]):
        raise CliError(
            f"--image-norm {text!r}: give MEAN,STD (e.g. 0.5,0.5) or three means then three positive deviations"
        )
    half = len(values) // 2
    return (values[:half] * (3 // half), values[half:] * (3 // half))


def _settings(args) -> RunSettings:
    """The run's one settings object, from whichever options this subcommand has."""
    from cosconvert.pipeline import RunSettings

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    blocks = get("reconstruct_blocks")
    amp = get("amp", "auto")
    return RunSettings.of(
        centered=get("centered", False), strip_norms=False if get("strip_norms", "off") == "off" else args.strip_norms,
        include=get("include"), exclude=get("exclude"), gain=get("gain", "channel"),
        reconstruct=get("reconstruct", False), reconstruct_blocks=[b.strip() for b in blocks.split(",")] if blocks else "auto",
        epochs=get("epochs", 0), distill=get("distill", True), lr=get("lr", 1e-3), batch_size=get("batch_size", 64),
        resume=get("resume", False), amp=None if amp == "none" else amp, fp16=get("fp16", False),
        inline=get("inline", False), dynamic_batch=not get("static_batch", False), providers=get("providers", "auto"),
        image_norm=_image_norm(get("image_norm")), device=get("device"), verbose=not get("quiet", False),
    )  # fmt: skip


def _source_metadata(args) -> dict:
    """What the ONNX file records about its source, so `cosconvert validate FILE.onnx` can rebuild it."""
    from cosconvert.onnx.export import file_sha256

    arch = args.arch or ""
    module, sep, attr = arch.rpartition(":")
    if sep and module.endswith(".py"):
        arch = f"{Path(module).resolve()}:{attr}"
    return {
        "source": str(Path(args.model).resolve()), "source_sha256": file_sha256(args.model), "arch": arch,
        "arch_kwargs": args.arch_kwargs or "",
    }  # fmt: skip


def _pipeline(args, steps: tuple[str, ...]) -> Pipeline:
    """Load the model and start a run of ``steps`` into the output folder (default: beside the model)."""
    from cosconvert.pipeline import Pipeline

    original, example = _load(args.model, args.arch, args.arch_kwargs, args.trust_pickle)
    model = Path(args.model)
    out = Path(args.out_dir) if args.out_dir else model.with_name(f"{model.stem}-cosine")
    return Pipeline(original, _settings(args), out, data=getattr(args, "data", None) or None,
                    inputs=args.input_shape or None, example=example, steps=steps,
                    metadata=_source_metadata(args), source=str(args.model))  # fmt: skip


def _finish(args, report: RunReport) -> int:
    """Print the summary (or the JSON), say why it failed, and return the exit code."""
    if args.json:
        print(report.to_json())
    else:
        if report.validation_text:
            print(report.validation_text)
        _print_summary(report.summary)
    code = report.exit_code()
    _say_verdict(report.validation or {}, code)
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
            on = f" ({f['samples']} samples)" if "samples" in f else ""
            print(f"fidelity, {words + ':':18} output cosine {f['cosine']:.4f}, top-1 agreement {top1}{on}")
    print("files written: " + ", ".join(summary["files"]))


def cmd_pipeline(args, steps: tuple[str, ...]) -> int:
    """``run`` and the one-step subcommands: one :class:`Pipeline` with those steps."""
    if "finetune" in steps and args.command == "run" and args.epochs <= 0:
        steps = tuple(s for s in steps if s != "finetune")
    pipeline = _pipeline(args, steps)
    return _finish(args, pipeline.run())


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
    if not args.input_shape and (meta.get("input_spec") or meta.get("input_shape")):
        args.input_shape = meta.get("input_spec") or ",".join(map(str, json.loads(meta["input_shape"])))
    args.out_dir = args.out_dir or str(path.parent)
    reference = Path(args.reference) if args.reference else path.with_name("converted.pt")
    if not reference.is_file():
        raise CliError(
            f"no converted model at {reference}: give the converted.pt {path.name} came from with --reference"
        )
    pipeline = _pipeline(args, ("validate",))
    pipeline.onnx_path = path
    return _finish(args, pipeline.run(recipe=reference))


def cmd_inspect(args) -> int:
    from cosconvert.conversion import inspect
    from cosconvert.inputs import InputSpec

    original, example = _load(args.model, args.arch, args.arch_kwargs, args.trust_pickle)
    inputs = (InputSpec.parse(args.input_shape, original).random(),) if args.input_shape else example or None
    report = inspect(original, _settings(args).cosine, example_inputs=inputs)
    print(report.to_json() if args.json else report)
    return 0


def cmd_demo(args) -> int:
    """Digits CNN with BatchNorm -> cosine (norms folded) -> calibrate -> distill -> ONNX -> validate: one run."""
    from cosconvert.demo import train_digits_cnn
    from cosconvert.pipeline import RunSettings, run

    if not args.quiet:
        print("training the example: a BatchNorm CNN on scikit-learn's digits", file=sys.stderr, flush=True)
    settings = RunSettings.of(strip_norms="fold", centered=args.centered, epochs=args.epochs, lr=3e-3,
                              verbose=not args.quiet)  # fmt: skip
    report = run(train_digits_cnn(), data="digits", settings=settings, out_dir=args.out_dir,
                 metadata={"source": "cosconvert demo: DigitsCNN trained on digits"})  # fmt: skip
    return _finish(args, report)


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
    g.add_argument("--input-shape", help="example input shape, batch first, and its dtype for token ids: 2,3,224,224 "
                   "or 2,16:int64 (ids drawn inside the model's vocabulary); if not given: the .pt2's example, else "
                   "from --data, else guessed from the first layer (an embedding: 2,16:int64), with a batch of 2")  # fmt: skip
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
    from cosconvert.version import __version__

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
    except Interrupted as err:
        return _fail(args, f"cosconvert: {err}", err.code)
    except CosconvertError as err:
        return _fail(args, f"cosconvert: error: {err}", err.code)
    except KeyboardInterrupt:
        return _fail(args, "cosconvert: interrupted", EXIT_INTERRUPT)
    except Exception as err:  # noqa: BLE001 - anything unforeseen still gets one line, not a traceback
        return _fail(args, f"cosconvert: internal error: {first_line(err, with_type=True)}; rerun with --debug for "
                     "details", EXIT_INTERNAL)  # fmt: skip


def _fail(args, line: str, code: int) -> int:
    """The one line on stderr (after the traceback, with --debug), and the exit code: the same either way."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
