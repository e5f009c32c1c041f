"""Freeze a converted network for inference: each cosine weight normalized once, not on every call.

A cosine layer divides its weight by the weight's norm (centered first, gain folded in) on every
forward, so that training sees the normalization. At inference the weight is constant, so
:func:`freeze` does that once; :func:`cosconvert.export_onnx` freezes before exporting, so the
ONNX graph holds no weight-norm arithmetic either.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from cosconvert import functional as CF
from cosconvert.convert import _fetch
from cosconvert.nn import _CosineMixin

__all__ = ["freeze"]

_PRENORMALIZED = {
    CF.cosine_linear: CF.linear_normalized,
    CF.cosine_conv1d: CF.conv_normalized,
    CF.cosine_conv2d: CF.conv_normalized,
    CF.cosine_conv3d: CF.conv_normalized,
}


def freeze(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, every cosine layer's weight normalized once,
    in modules and in the graph's functional calls on stored weights alike."""
    frozen = copy.deepcopy(model).eval()
    for module in frozen.modules():
        if isinstance(module, _CosineMixin):
            module.prenormalize()
        if isinstance(module, fx.GraphModule):
            _prenormalize_calls(module)
    return frozen


@torch.no_grad()
def _prenormalize_calls(gm: fx.GraphModule) -> None:
    """``cosine_conv2d(x, self.w, ..., gain=self.g)`` -> ``conv_normalized(x, <w normalized once>, ...)``."""
    for i, node in enumerate(list(gm.graph.nodes)):
        weight = node.args[1] if node.op == "call_function" and node.target in _PRENORMALIZED else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        kwargs = dict(node.kwargs)
        gain = kwargs.pop("gain", None)
        if gain is not None and not (isinstance(gain, fx.Node) and gain.op == "get_attr"):
            continue
        w_hat = CF.normalize_weight(
            _fetch(gm, weight.target), centered=kwargs.get("centered", False), eps=kwargs.get("eps", 1e-6),
            gain=None if gain is None else _fetch(gm, gain.target),
        )  # fmt: skip
        name = f"_prenormalized_weight_{i}"
        gm.register_buffer(name, w_hat)
        with gm.graph.inserting_before(node):
            node.args = (node.args[0], gm.graph.get_attr(name), *node.args[2:])
        node.target, node.kwargs = _PRENORMALIZED[node.target], kwargs
    gm.graph.eliminate_dead_code()
    gm.recompile()
