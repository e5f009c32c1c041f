"""cosconvert: turn a PyTorch network into its cosine-normalized twin, fine-tune it and ship it as ONNX."""

from cosconvert import functional, nn

__version__ = "0.1.0"
__all__ = ["functional", "nn", "__version__"]
