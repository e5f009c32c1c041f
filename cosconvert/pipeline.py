"""``cosconvert.run``: the whole pipeline as one library call.

    report = cosconvert.run(model, data="train.npz", strip_norms="fold", epochs=3, out_dir="net-cosine")
    report.validation["status"], report.files

It converts the model (and calibrates it on the data), reconstructs it block by block if asked,
fine-tunes it (by distillation from the original unless ``distill=False``), exports it to ONNX and
validates the file, measuring fidelity to the original after each stage. Everything it writes goes
to ``out_dir``: ``converted.pt`` (the :func:`cosconvert.save` recipe), ``checkpoints/``,
``model.onnx`` and ``report.json`` (:meth:`RunReport.to_json`). The command line is this call: each
subcommand is a :class:`Pipeline` with some steps left out, reading what the earlier steps left in
the folder and adding to its ``report.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from cosconvert.calibration import calibrate
from cosconvert.config import CosineConfig
from cosconvert.conversion import convert
from cosconvert.errors import INCONCLUSIVE, VALIDATION_FAILED, InputError, Interrupted, OutputError, first_line
from cosconvert.finetuning import evaluate, finetune
from cosconvert.inputs import InputSpec
from cosconvert.onnx import export_onnx, validate
from cosconvert.recipe import restore, save
from cosconvert.reconstruction import reconstruct

__all__ = ["RunSettings", "RunReport", "Pipeline", "run", "STEPS"]

STEPS = ("convert", "finetune", "export", "validate")
VALIDATION_BATCHES = (1, 8)  # batch sizes validation feeds (a dynamic batch is checked at two sizes)


@dataclass
class RunSettings:
    """Every setting of a run, validated once. ``cosine``: how to convert (:class:`CosineConfig`).
    ``reconstruct``: block by block after calibration (``reconstruct_blocks``: "auto" or names).
    Fine-tuning: ``epochs`` (0: none), by distillation from the original unless ``distill=False``.
    Export: ``fp16``, ``inline`` (plain ONNX ops instead of the cosine functions),
    ``dynamic_batch``. ``providers``: onnxruntime providers to validate on ("auto", or names).
    :meth:`of` takes all of them as flat keywords."""

    cosine: CosineConfig = field(default_factory=CosineConfig)
    reconstruct: bool = False
    reconstruct_blocks: str | list[str] = "auto"
    epochs: int = 0
    distill: bool = True
    lr: float = 1e-3
    batch_size: int = 64
    resume: bool = False
    amp: str | None = "auto"
    fp16: bool = False
    inline: bool = False
    dynamic_batch: bool = True
    providers: str | list[str] = "auto"
    image_size: int | None = None  # images in a data folder are resized to this (default: the input's size)
    image_norm: tuple | None = None  # (mean, std) per channel for a data folder's images
    device: str | None = None
    verbose: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.cosine, CosineConfig):
            raise InputError(f"cosine must be a CosineConfig, got {type(self.cosine).__name__}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise InputError("epochs must be 0 or more, batch_size at least 1, and lr positive")
        if self.reconstruct_blocks != "auto":
            self.reconstruct = True  # naming the blocks asks for reconstruction

    @classmethod
    def of(cls, **settings) -> RunSettings:
        """The settings from flat keywords: :class:`CosineConfig`'s (``strip_norms="fold"``) and this
        class's (``epochs=3``)."""
        names = {f.name for f in fields(CosineConfig)}
        unknown = set(settings) - names - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown settings {sorted(unknown)}; see help(cosconvert.RunSettings)")
        try:
            cosine = CosineConfig(**{k: v for k, v in settings.items() if k in names})
        except ValueError as err:
            raise InputError(str(err)) from err
        return cls(cosine=cosine, **{k: v for k, v in settings.items() if k not in names})


@dataclass
class RunReport:
    """What a run did and measured; :meth:`to_json` is ``report.json``. ``stages`` maps each stage
    (original, converted, calibrated, reconstructed, after) to its accuracy (with labelled held-out
    data) and fidelity to the original; ``validation`` is :class:`ValidationReport`'s dict."""

    summary: dict = field(default_factory=dict)
    validation_text: str = ""  # the validation table, as printed

    @property
    def validation(self) -> dict | None:
        return self.summary.get("validation")

    @property
    def status(self) -> str:
        """``"pass"``, ``"fail"`` or ``"inconclusive"`` of the validation, or ``"not validated"``."""
        return (self.validation or {}).get("status", "not validated")

    @property
    def files(self) -> list[str]:
        return self.summary.get("files", [])

    @property
    def conversion(self) -> dict | None:
        return self.summary.get("conversion")

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=2)

    def exit_code(self) -> int:
        """The command line's exit code for this run: 0, or validation's failure or inconclusive verdict."""
        return {"fail": VALIDATION_FAILED, "inconclusive": INCONCLUSIVE}.get(self.status, 0)


class _Steps:
    """Numbered progress lines on stderr."""

    def __init__(self, total: int, verbose: bool) -> None:
        self.total, self.done, self.verbose = total, 0, verbose

    def __call__(self, text: str) -> None:
        self.done += 1
        if self.verbose:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.verbose:
            print(f"      {text}", file=sys.stderr, flush=True)


def out_folder(path: Path) -> Path:
    """``path``, created, once shown writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to output folder {path} ({err.strerror}); choose another with --out-dir"
        ) from err
    return path


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _check_runs(model: nn.Module, spec: InputSpec) -> None:
    try:
        with torch.no_grad(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # fx prints code
            model(spec.zeros(_device_of(model)))
    except Exception as err:  # noqa: BLE001 - any failure means the shape does not fit the model
        raise InputError(f"the model does not run on input {spec}: {first_line(err)}; fix --input-shape") from err


def _batch_sizes(model: nn.Module, spec: InputSpec) -> tuple[int, ...]:
    """VALIDATION_BATCHES where the model runs at any batch size, else only the batch it was given."""
    try:
        _check_runs(model, spec.at_batch(max(VALIDATION_BATCHES)))
    except InputError:
        return (spec.shape[0],)
    return VALIDATION_BATCHES


class Pipeline:
    """One run's state: the original, the settings, the data, the output folder, the converted model
    and what was measured and written. Its steps run in the order of :data:`STEPS`."""

    def __init__(
        self, original: nn.Module, settings: RunSettings, out_dir: str | Path, *, data=None,
        inputs: InputSpec | tuple | str | None = None, example: tuple | None = None, steps: Iterable[str] = STEPS,
        metadata: dict | None = None, source: str = "model",
    ) -> None:  # fmt: skip
        self.settings, self.steps = settings, tuple(steps)
        self.out = out_folder(Path(out_dir))
        self.metadata = metadata or {}
        self.previous = self._previous_report()
        self.original = self._on_device(original)
        if isinstance(inputs, str):
            inputs = InputSpec.parse(inputs, self.original)
        elif isinstance(inputs, tuple):
            inputs = InputSpec(inputs)
        self.data, self.held_out, evaluated_on = self._data(data, inputs)
        if "finetune" in self.steps and self.data is None:
            raise InputError(f"fine-tuning for {settings.epochs} epochs needs data: give --data "
                             "(digits, a .npz, an image folder or module:callable)")  # fmt: skip
        if settings.reconstruct and "convert" in self.steps and self.data is None:
            raise InputError("--reconstruct needs --data (inputs to reconstruct on; labels are not needed)")
        self.spec = self._input_spec(inputs, example)
        _check_runs(self.original, self.spec)
        self.say = _Steps(1 + len(self.steps), settings.verbose)
        self.say(
            f"loaded {source} ({sum(p.numel() for p in self.original.parameters()):,} parameters), input {self.spec}"
        )
        self.batch_sizes = _batch_sizes(self.original, self.spec)
        self.evaluated_on = evaluated_on or f"random example inputs {self.spec.at_batch(self.batch_sizes[-1])}"
        self.converted: nn.Module | None = None
        self.onnx_path = self.out / "model.onnx"  # the file validation reads (this run's, once exported)
        self.recipe = self.out / "converted.pt"  # the conversion a step without convert restores
        self.files: list[str] = []
        self.validation_text = ""
        self.summary: dict = {"input": source, "input_shape": list(self.spec.shape), "input_spec": self.spec.text(),
                              "evaluated_on": self.evaluated_on}  # fmt: skip

    # -- setting up ---------------------------------------------------------------------------------
    def _previous_report(self) -> dict:
        """The folder's report.json, where this run continues an earlier one (no convert step)."""
        path = self.out / "report.json"
        if "convert" in self.steps or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _on_device(self, model: nn.Module) -> nn.Module:
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return model.to(torch.device(device))
        except (RuntimeError, AssertionError) as err:
            raise InputError(f"--device {device} is not available here ({first_line(err)}); try --device cpu") from err

    def _data(self, spec, inputs: InputSpec | None):
        """(data to calibrate and fine-tune on, held-out data to measure on, what the latter is)."""
        if spec is None:
            return None, None, None
        if not isinstance(spec, (str, Path)):
            return spec, None, None
        from cosconvert.data import DataError, held_out_split

        size = self.settings.image_size or (inputs.shape[-1] if inputs is not None else 224)
        try:
            return held_out_split(str(spec), self.settings.batch_size, image_size=size,
                                  image_norm=self.settings.image_norm)  # fmt: skip
        except DataError as err:
            raise InputError(str(err)) from err

    def _input_spec(self, given: InputSpec | None, example: tuple | None) -> InputSpec:
        """As given; else the program's example, the data's, what an earlier step recorded, or a guess."""
        from cosconvert.inputs import EXAMPLE_BATCH

        if given is not None:
            return given
        if example:
            return InputSpec.like(example[0], self.original)
        if self.data is not None:
            from cosconvert.data import batch_inputs

            return InputSpec.like(batch_inputs(next(iter(self.data)))[0], self.original, batch=EXAMPLE_BATCH)
        if self.previous.get("input_spec"):
            return InputSpec.parse(self.previous["input_spec"], self.original)
        return InputSpec.guess(self.original)

    def wrote(self, *paths: Path) -> None:
        for p in paths:
            if str(p) not in self.files:
                self.files.append(str(p))

    def example_batches(self) -> list:
        """Inputs to measure fidelity and parity on: held-out data, else seeded random example inputs."""
        if self.held_out is not None:
            from cosconvert.data import batch_inputs

            real = batch_inputs(next(iter(self.held_out)))[0]
            return [real[:b] for b in self.batch_sizes]
        g = torch.Generator().manual_seed(0)
        return [self.spec.at_batch(b).random(g) for b in self.batch_sizes]

    def measure(self, stage: str) -> None:
        """Accuracy on the held-out data (where it has labels) and fidelity to the original, into the summary."""
        from cosconvert.onnx.validate import fidelity

        if self.held_out is not None:
            if "accuracy_original" not in self.summary:
                self.summary["accuracy_original"] = evaluate(self.original, self.held_out)
            self.summary[f"accuracy_{stage}"] = evaluate(self.converted, self.held_out, self.original)
        if self.held_out is not None:  # the whole held-out set, as accuracy is measured on
            from cosconvert.data import batch_inputs

            batches = [batch_inputs(b)[0] for b in self.held_out]
        else:
            batches = self.example_batches()
        result = {**fidelity(self.converted, self.original, batches), "samples": sum(len(b) for b in batches)}
        self.summary[f"fidelity_{stage}"] = result
        top1 = "" if result["top1_agreement"] is None else f", top-1 agreement {result['top1_agreement']:.1f}%"
        self.say.note(f"fidelity to the original: output cosine {result['cosine']:.4f}{top1}")

    # -- the steps ----------------------------------------------------------------------------------
    def convert(self) -> None:
        """Convert (and calibrate on the data), reconstruct if asked, then save the recipe."""
        from cosconvert.calibration import summary as calibration_summary
        from cosconvert.data import batch_inputs

        s = self.settings
        self.say("converting" + (" and calibrating" if self.data is not None else ""))
        device = _device_of(self.original)
        calibration = (
            None if self.data is None else [batch_inputs(b)[0].to(device) for _, b in zip(range(8), self.data)]
        )
        example = self.spec.random(torch.Generator().manual_seed(0), device) if calibration is None else calibration[0]
        self.converted = convert(self.original, s.cosine, example_inputs=example)
        self.say.note(self.converted.cosine_report.summary())
        stage = "converted"
        self.measure(stage)
        if calibration is not None:
            self.say.note(calibration_summary(calibrate(self.converted, self.original, calibration)))
            stage = "calibrated"
            self.measure(stage)
        if s.reconstruct:
            self.say.note("reconstructing block by block")
            blocks = s.reconstruct_blocks
            try:
                reconstruct(self.converted, self.original, self.data, blocks=blocks, amp=s.amp,
                                       verbose=s.verbose)  # fmt: skip
            except ValueError as err:
                if blocks == "auto":
                    raise
                raise InputError(f"--reconstruct-blocks: {err}") from err
            stage = "reconstructed"
            self.measure(stage)
        for kind in ("accuracy", "fidelity"):  # "before": the model as fine-tuning gets it
            if f"{kind}_{stage}" in self.summary:
                self.summary[f"{kind}_before"] = self.summary[f"{kind}_{stage}"]
        save(self.converted, self.staged("converted.pt"))

    def restore(self, recipe: Path | None = None) -> None:
        """The saved conversion (converted.pt in the output folder, or ``recipe``), for the steps after it."""
        recipe = recipe or self.recipe
        if not recipe.is_file():
            raise InputError(f"no converted model at {recipe}: run `cosconvert convert` first, or give --out-dir")
        try:
            self.converted = restore(self.original, recipe)
        except (ValueError, RuntimeError, KeyError) as err:
            raise InputError(f"{recipe} does not restore onto this model ({first_line(err)})") from err

    def finetune(self) -> None:
        """Fine-tune (by distillation unless ``distill=False``), checkpointing into checkpoints/; save the result."""
        s = self.settings
        self.say(f"fine-tuning for {s.epochs} epochs" + (" by distillation" if s.distill else " with labels"))
        folder = self.out / "checkpoints"
        log = finetune(self.converted, self.data, teacher=self.original if s.distill else None,
                                  epochs=s.epochs, lr=s.lr, eval_data=self.held_out, checkpoint_dir=folder,
                                  checkpoint_every=50, resume=s.resume, amp=s.amp, verbose=s.verbose)  # fmt: skip
        self.summary["finetune"] = log
        self.wrote(*sorted(p for p in folder.iterdir() if not p.name.startswith(".")))
        self.measure("after")
        save(self.converted, self.staged("converted.pt"))

    def export(self) -> None:
        """Export to model.onnx at the run's input shape; the file's metadata names its source."""
        from cosconvert.onnx.export import ExportError

        s = self.settings
        self.say("exporting to ONNX" + (" (fp16)" if s.fp16 else ""))
        example = self.spec.random(torch.Generator().manual_seed(0), _device_of(self.converted))
        metadata = {**self.metadata, "input_shape": json.dumps(list(self.spec.shape)), "input_spec": self.spec.text()}
        self.onnx_path = self.staged("model.onnx")
        try:
            export_onnx(self.converted, example, self.onnx_path, fp16=s.fp16, inline=s.inline,
                                   dynamic_batch=s.dynamic_batch, metadata=metadata)  # fmt: skip
        except ExportError as err:
            raise InputError(str(err)) from err
        if self.onnx_path.with_name("model.onnx.data").exists():
            self.staged("model.onnx.data")

    def validate(self) -> str:
        """Fidelity to the original and ONNX parity; returns the verdict (pass, fail, inconclusive)."""
        if not self.onnx_path.is_file():
            raise InputError(f"no ONNX file at {self.onnx_path}: run `cosconvert export` first, or give --out-dir")
        self.say("validating: fidelity to the original, and the ONNX file against PyTorch")
        reference = self.converted.half() if _file_dtype(self.onnx_path) == "float16" else self.converted
        batches = self.example_batches()
        on = f"{sum(len(b) for b in batches)} samples of {self.evaluated_on}"
        report = validate(self.onnx_path, reference, batches, original=self.original,
                                     inputs_name=on, providers=self.settings.providers)  # fmt: skip
        if self.onnx_path.parent == self.stage:  # a staged file: named where it will be
            report.path = str(self.out / self.onnx_path.name)
        self.summary["validation"] = report.to_dict()
        self.validation_text = str(report)
        return report.status

    def staged(self, name: str) -> Path:
        """Where this run writes ``name``: its staging folder, moved into the output folder only when the
        run ends (so a failed or interrupted run leaves the previous run's files as they were)."""
        self.wrote(self.out / name)
        return self.stage / name

    def finish(self) -> RunReport:
        """Write report.json (what earlier steps in this folder recorded, then this run's; every file
        written, itself included), move this run's files into the output folder, and return the report."""
        if self.converted is not None:
            self.summary["conversion"] = self.converted.cosine_report.to_dict()
        self.staged("report.json")
        files = [f for f in self.previous.get("files", []) if f not in self.files and Path(f).exists()]
        summary = {**self.previous, **self.summary, "files": files + self.files}
        (self.stage / "report.json").write_text(json.dumps(summary, indent=2))
        if "export" in self.steps and not (self.stage / "model.onnx.data").exists():
            (self.out / "model.onnx.data").unlink(missing_ok=True)  # an earlier export's weights, not this one's
        for name in ("converted.pt", "model.onnx.data", "model.onnx", "report.json"):  # the report last
            if (self.stage / name).exists():
                os.replace(self.stage / name, self.out / name)
        self.stage.rmdir()
        if self.onnx_path.parent == self.stage:
            self.onnx_path = self.out / "model.onnx"
        return RunReport(summary, self.validation_text)

    def run(self, recipe: Path | None = None) -> RunReport:
        """Every step asked for, in order, then report.json. Without the convert step, the conversion is
        restored from ``recipe`` (default: the folder's converted.pt). Nothing this run writes reaches its
        final name unless it ends (checkpoints excepted: an interrupted fine-tune resumes from them)."""
        self.stage = Path(tempfile.mkdtemp(dir=self.out, prefix=".run-"))  # this run's files, until it ends
        step = "converting"
        try:
            if "convert" in self.steps:
                self.convert()
            else:
                self.restore(recipe)
            if "finetune" in self.steps:
                step = "fine-tuning"
                self.finetune()
            step = "exporting"
            if "export" in self.steps:
                self.export()
            step = "validating"
            if "validate" in self.steps:
                self.validate()
            return self.finish()
        except KeyboardInterrupt as err:
            if step == "fine-tuning":
                raise Interrupted("interrupted; rerun with --resume to continue fine-tuning") from err
            raise Interrupted(f"interrupted while {step}; nothing of this run was kept") from err
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)


def _file_dtype(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return "float16" if proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"


def run(
    model: nn.Module, *, data=None, inputs: InputSpec | tuple | str | None = None, settings: RunSettings | None = None,
    out_dir: str | Path = "cosconvert-run", steps: Iterable[str] = STEPS, metadata: dict | None = None, **kwargs,
) -> RunReport:  # fmt: skip
    """Convert ``model`` to its cosine twin, calibrate it on ``data``, reconstruct and fine-tune it as
    ``settings`` asks, export it to ONNX and validate the file, writing everything to ``out_dir``.

    Args:
        data: inputs to calibrate, reconstruct and fine-tune on: a data spec (``"digits"``, an ``.npz``,
            an image folder; a tenth is held out to measure on), or a DataLoader / iterable of batches.
        inputs: the example input: an :class:`~cosconvert.inputs.InputSpec`, a shape (batch first, float),
            or ``"2,16:int64"`` (token ids of the model's vocabulary); default: the data's, else guessed
            from the first layer (an embedding: token ids).
        settings: a :class:`RunSettings`; or give its fields and :class:`CosineConfig`'s as keywords
            (``epochs=3, strip_norms="fold"``).
        steps: which of :data:`STEPS` to run (fine-tuning only where ``epochs`` > 0).
        metadata: recorded in the ONNX file (its source, for ``cosconvert validate``).

    Returns the :class:`RunReport` (also written as ``out_dir/report.json``). Raises
    :class:`~cosconvert.errors.InputError` on inputs that do not fit, and
    :class:`~cosconvert.errors.OutputError` where ``out_dir`` cannot be written.
    """
    settings = settings or RunSettings.of(**kwargs)
    steps = tuple(s for s in steps if s != "finetune" or settings.epochs > 0)
    return Pipeline(model, settings, out_dir, data=data, inputs=inputs, steps=steps, metadata=metadata,
                    source=type(model).__name__).run()  # fmt: skip
