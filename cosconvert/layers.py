"""What the converter recognizes in a network: the dot-product layers it swaps for their cosine
twins, the normalizers it may strip, and the linear-like layers it leaves alone (with why).

These are the leaves of its fx trace (:mod:`cosconvert.trace`): a graph stops at them, and the
conversion (:mod:`cosconvert.conversion`) decides what each becomes.
"""

from __future__ import annotations

from torch import nn

from cosconvert.nn import (
    CosineConv1d,
    CosineConv2d,
    CosineConv3d,
    CosineLinear,
    CosineMultiheadAttention,
    _CosineMixin,
)

# Each layer class and its cosine twin.
LAYERS = {
    nn.Linear: CosineLinear,
    nn.Conv1d: CosineConv1d,
    nn.Conv2d: CosineConv2d,
    nn.Conv3d: CosineConv3d,
    nn.MultiheadAttention: CosineMultiheadAttention,
}
NORMS = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RMSNorm,
)
# Linear-like layers the converter leaves as they are, and why. Checked before LAYERS (LazyLinear is a Linear).
UNCONVERTIBLE = {
    nn.modules.lazy.LazyModuleMixin: "lazy layer, not initialized: run one forward before converting",
    nn.modules.conv._ConvTransposeNd: "transposed convolution: an output sums over scattered inputs, no receptive field",
    nn.RNNBase: "recurrent layer: its gate dot products run inside one fused op",
    nn.Bilinear: "bilinear form x1^T W x2, not a dot product with one input",
}
LEAVES = (*LAYERS, *UNCONVERTIBLE, _CosineMixin)
_NORM_FORWARDS = {cls.forward for cls in (*NORMS, nn.SyncBatchNorm)}
_LAYER_FORWARDS = {cls.forward for cls in LAYERS}


def own_forward(m: nn.Module) -> bool:
    """A linear/conv/attention subclass with a forward of its own (timm's ``Conv2dSame`` pads,
    ``StdConv2d`` standardizes its weight, a LoRA wrapper adds a branch): swapping it for a twin
    would lose what its forward does, so it is traced (or run under CosineCalls) instead."""
    return isinstance(m, tuple(LAYERS)) and not isinstance(m, _CosineMixin) and type(m).forward not in _LAYER_FORWARDS


def is_norm(m: nn.Module) -> bool:
    """A normalizer with its torch forward. A subclass with its own forward (torchvision's
    channels-first LayerNorm2d) is traced through instead, so its functional call is seen."""
    return isinstance(m, NORMS) and type(m).forward in _NORM_FORWARDS


def is_done(m: nn.Module) -> bool:
    """Converted already: run under CosineCalls, or running a rewritten graph."""
    return getattr(type(m), "_cosine_scoped", False) or getattr(type(m), "_cosine_graph", False)


def is_leaf(m: nn.Module) -> bool:
    """A module the trace stops at: a layer, a normalizer, or one converted already."""
    return isinstance(m, LEAVES) or is_norm(m) or is_done(m)


def out_units(module: nn.Module) -> int | None:
    """Output units of a linear/conv layer, else None."""
    return getattr(module, "out_features", None) or getattr(module, "out_channels", None)
