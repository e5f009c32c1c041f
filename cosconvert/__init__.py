"""cosconvert: turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as ONNX.

Each public name is imported from its module on first use, so ``cosconvert --version`` answers
without loading torch.
"""

from __future__ import annotations

import importlib

from cosconvert.version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "CosineConfig": "cosconvert.config",
    "convert": "cosconvert.conversion",
    "inspect": "cosconvert.conversion",
    "report_of": "cosconvert.conversion",
    "calibrate": "cosconvert.calibration",
    "freeze": "cosconvert.freezing",
    "finetune": "cosconvert.finetuning",
    "reconstruct": "cosconvert.reconstruction",
    "export_onnx": "cosconvert.onnx",
    "validate": "cosconvert.onnx",
    "save": "cosconvert.recipe",
    "restore": "cosconvert.recipe",
    "ConversionReport": "cosconvert.report",
    "run": "cosconvert.pipeline",
    "RunSettings": "cosconvert.pipeline",
    "RunReport": "cosconvert.pipeline",
}
_SUBMODULES = ("functional", "nn")

__all__ = [*_SUBMODULES, *_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule: cosconvert.errors, cosconvert.onnx, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
