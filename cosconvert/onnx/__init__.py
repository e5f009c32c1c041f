"""ONNX export with cosine custom ops, and validation of the file against PyTorch."""

from cosconvert.onnx.export import export_onnx
from cosconvert.onnx.validate import ValidationReport, available_providers, validate

__all__ = ["export_onnx", "validate", "ValidationReport", "available_providers"]
