"""Normalizers off the activation path: ``convert(strip_norms="drop" | "fold")``.

A BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm, as a module or as a functional call in a
traced graph, is dropped, or with ``"fold"`` its learned scale and shift are kept: folded into
the gain and bias of the cosine layer it directly follows where that is exact, else kept as an
:class:`Affine`. A normalizer over a weight (StdConv's ``batch_norm`` of its weight) is part of
that weight's transform and is never stripped. Each action is written to the report.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cosconvert.config import CosineConfig
from cosconvert.nn import CosineConv1d, CosineConv2d, CosineConv3d, CosineLinear, _CosineMixin
from cosconvert.report import ConversionReport
from cosconvert.trace import from_constants, function_name, join, node_path

__all__ = ["Affine", "NormStripper"]


# Functional normalizers: target -> (index of weight, index of bias or None, channel dim of the affine).
NORM_FUNCTIONS = {
    F.batch_norm: (3, 4, 1),
    F.instance_norm: (3, 4, 1),
    F.group_norm: (2, 3, 1),
    F.layer_norm: (2, 3, -1),
    F.rms_norm: (2, None, -1),
    torch.batch_norm: (1, 2, 1),
    torch.instance_norm: (1, 2, 1),
    torch.group_norm: (2, 3, 1),
    torch.layer_norm: (2, 3, -1),
    torch.rms_norm: (2, None, -1),
    # ATen spellings, as in the graphs of torch.export programs (.pt2)
    torch.ops.aten.batch_norm.default: (1, 2, 1),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (1, 2, 1),
    torch.ops.aten.instance_norm.default: (1, 2, 1),
    torch.ops.aten.group_norm.default: (2, 3, 1),
    torch.ops.aten.layer_norm.default: (2, 3, -1),
    torch.ops.aten.native_layer_norm.default: (2, 3, -1),
    torch.ops.aten.rms_norm.default: (2, None, -1),
}
# Those that return (output, statistics...): their users take item 0.
_TUPLE_NORMS = {torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.native_layer_norm.default}


def affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """``x * weight + bias`` per channel: ``channel_dim`` 1 for (N, C, ...), -1 for the trailing dims."""
    if channel_dim == 1:
        shape = (-1,) + (1,) * (x.dim() - 2)
        weight = None if weight is None else weight.view(shape)
        bias = None if bias is None else bias.view(shape)
    x = x if weight is None else x * weight
    return x if bias is None else x + bias


class Affine(nn.Module):
    """The learned scale and shift a stripped normalizer leaves behind."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, channel_dim: int) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine(x, self.weight, self.bias, self.channel_dim)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}"


def _norm_channel_dim(norm: nn.Module) -> int:
    return -1 if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) else 1


class NormStripper:
    """Strips the normalizers of one conversion as ``config.strip_norms`` says, writing what it
    did to ``report.stripped``."""

    def __init__(self, config: CosineConfig, report: ConversionReport) -> None:
        self.mode, self.report = config.strip_norms, report

    def strip_leaf(self, norm: nn.Module, name: str) -> nn.Module:
        """A normalizer outside any graph: dropped, or its affine kept (nothing to fold into)."""
        if not self.mode:
            return norm
        if self.mode == "fold" and _has_affine(norm):
            self._stripped(name, norm, f"kept as affine{_running(norm)} (no graph to fold through)")
            return Affine(*_kept_affine(norm), _norm_channel_dim(norm))
        self._stripped(name, norm, "dropped")
        return nn.Identity()

    def strip_node(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """A normalizer module called in ``gm``: dropped, or with ``"fold"`` folded into the cosine
        layer it directly follows, else replaced by an :class:`Affine`."""
        if not self.mode or from_constants(node.args[0]):  # a weight's normalizer is its transform
            return
        norm = gm.get_submodule(node.target)
        name = join(prefix, node.target)
        source = node.args[0]
        layer = gm.get_submodule(source.target) if source.op == "call_module" else None
        if self.mode == "fold" and _has_affine(norm):
            reason = _cannot_fold(layer, norm, source)
            if reason is not None:
                gm.set_submodule(node.target, Affine(*_kept_affine(norm), _norm_channel_dim(norm)))
                self._stripped(name, norm, f"kept as affine{_running(norm)} ({reason})")
                return
            _stash_target(layer, norm)
            _fold(layer, norm)
            self._stripped(name, norm, f"folded into {join(prefix, source.target)}")
        else:
            if isinstance(layer, _CosineMixin) and len(source.users) == 1:
                _stash_target(layer, norm)
            self._stripped(name, norm, "dropped")
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)

    def strip_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """A functional normalizer call in ``gm`` (a key of :data:`NORM_FUNCTIONS`): dropped, or with
        ``"fold"`` its scale and shift kept as an :func:`affine` call."""
        if not self.mode or from_constants(node.args[0]):  # a weight's normalizer is its transform
            return
        w_at, b_at, channel_dim = NORM_FUNCTIONS[node.target]

        def arg(index, key):
            if index is None:
                return None
            return node.args[index] if len(node.args) > index else node.kwargs.get(key)

        weight, bias = arg(w_at, "weight"), arg(b_at, "bias")
        name = join(prefix, node_path(node))
        outputs = [node]
        if node.target in _TUPLE_NORMS:  # only its output (item 0) may be used, not its statistics
            outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            if len(outputs) != len(node.users):
                return
        fold = self.mode == "fold" and (weight is not None or bias is not None)
        if fold:
            with gm.graph.inserting_before(node):
                value = gm.graph.call_function(affine, (node.args[0], weight, bias, channel_dim))
            self._stripped(name, function_name(node.target), "kept as affine (functional)")
        else:
            value = node.args[0]
            self._stripped(name, function_name(node.target), "dropped")
        for out in outputs:
            out.replace_all_uses_with(value)
            if out is not node:
                gm.graph.erase_node(out)
        gm.graph.erase_node(node)

    def _stripped(self, name: str, norm: nn.Module | str, action: str) -> None:
        kind = norm if isinstance(norm, str) else type(norm).__name__
        self.report.stripped.append({"name": name, "type": kind, "action": action})


def _has_affine(norm: nn.Module) -> bool:
    return getattr(norm, "weight", None) is not None or _has_running_stats(norm)


def _has_running_stats(norm: nn.Module) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None


def _running(norm: nn.Module) -> str:
    return ", running statistics included" if _has_running_stats(norm) else ""


def _kept_affine(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The scale and shift an :class:`Affine` keeps of a stripped normalizer. A BatchNorm with running
    statistics is an affine map in eval mode, ``gamma (x - mean) / sqrt(var + eps) + beta``, and is kept
    whole: nothing stands in for its normalization where it does not directly follow a cosine layer.
    Normalizers that take their statistics from each input keep ``gamma`` and ``beta``."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not _has_running_stats(norm):
        return weight, bias
    scale = (norm.running_var + norm.eps).rsqrt()
    weight = scale if weight is None else weight.detach() * scale
    shift = -norm.running_mean * weight
    return weight, shift if bias is None else shift + bias.detach()


def _stash_target(layer: _CosineMixin, norm: nn.Module) -> None:
    """Keep, beside ``layer``, its bias as it was and the normalizer stripped after it: the layer's
    calibration target (:mod:`cosconvert.calibration`)."""
    bias = None if layer.bias is None else layer.bias.detach().clone()
    object.__setattr__(layer, "_stripped_norm", (bias, copy.deepcopy(norm).eval()))


def _cannot_fold(layer, norm: nn.Module, source: fx.Node) -> str | None:
    """Why ``norm``'s affine cannot be folded into ``layer``, or None if it can."""
    if not isinstance(layer, (CosineLinear, CosineConv1d, CosineConv2d, CosineConv3d)):
        return "not directly after a cosine layer"
    if len(source.users) != 1:
        return "the layer's output has other users"
    if (norm.weight.numel() if norm.weight is not None else norm.num_features) != layer.weight.shape[0]:
        return "its affine does not match the layer's output units"
    is_conv = not isinstance(layer, CosineLinear)
    per_channel = isinstance(
        norm, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
    )
    if is_conv != per_channel and not isinstance(norm, nn.BatchNorm1d):
        return "it normalizes another axis than the layer's output units"
    return None


def _fold(layer: _CosineMixin, norm: nn.Module) -> None:
    """``gamma * (g * cos + b) + beta`` = ``(gamma * g) * cos + (gamma * b + beta)``."""
    gamma = norm.weight.detach() if norm.weight is not None else layer.weight.new_ones(layer.weight.shape[0])
    beta = getattr(norm, "bias", None)
    if layer.gain is None or layer.gain.numel() == 1:
        layer.set_gain("channel")
    with torch.no_grad():
        bias = layer.bias if layer.bias is not None else torch.zeros_like(gamma)
        layer.gain.mul_(gamma)
        shifted = gamma * bias + (0 if beta is None else beta.detach())
        layer.bias = nn.Parameter(shifted.to(layer.weight.dtype))
