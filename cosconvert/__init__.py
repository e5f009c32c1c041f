"""cosconvert: turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as ONNX."""

from cosconvert import functional, nn
from cosconvert.calibration import calibrate
from cosconvert.config import CosineConfig
from cosconvert.convert import convert, inspect, report_of
from cosconvert.finetune import finetune  # the function: cosconvert.finetune(model, data, teacher=...)
from cosconvert.freeze import freeze
from cosconvert.onnx import export_onnx, validate
from cosconvert.pipeline import RunReport, RunSettings, run
from cosconvert.recipe import restore, save
from cosconvert.reconstruct import reconstruct  # the function: cosconvert.reconstruct(converted, original, data)
from cosconvert.report import ConversionReport

__version__ = "0.1.0"
__all__ = [
    "functional",
    "nn",
    "CosineConfig",
    "convert",
    "inspect",
    "report_of",
    "calibrate",
    "freeze",
    "finetune",
    "reconstruct",
    "export_onnx",
    "validate",
    "save",
    "restore",
    "ConversionReport",
    "run",
    "RunSettings",
    "RunReport",
    "__version__",
]
