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
from cosconvert.nn import _CosineMixin
from cosconvert.trace import Tracer, fetch, from_constants, graft

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
        elif getattr(type(module), "_cosine_graph", False):
            _prenormalize_grafted(module)
    return frozen


def _prenormalize_grafted(module: nn.Module) -> None:
    """A submodule running a converted graph as its forward (a ``StdConv2d`` keeps its class): its
    graph traced again, prenormalized, and grafted back, so its weight transform runs here once,
    not in the exported graph."""
    tracer = Tracer(
        autowrap_functions=tuple(f for f in vars(CF).values() if getattr(f, "__module__", "") == CF.__name__)
    )
    try:
        gm = fx.GraphModule(module, tracer.trace(module), type(module).__name__)
    except Exception:  # noqa: BLE001 - untraceable: it keeps normalizing its weight on each call, still right
        return
    if _prenormalize_calls(gm):
        graft(module, gm)


@torch.no_grad()
def _prenormalize_calls(gm: fx.GraphModule) -> int:
    """``cosine_conv2d(x, <w>, ..., gain=<g>)`` -> ``conv_normalized(x, <w normalized once>, ...)``, where
    ``<w>`` and ``<g>`` derive from stored tensors alone: a stored weight, or one a weight transform
    computes (StdConv's ``batch_norm`` over its weight), which runs here once, in torch. Returns how many."""
    values: dict[fx.Node, object] = {}
    done = 0
    for i, node in enumerate(list(gm.graph.nodes)):
        weight = node.args[1] if node.op == "call_function" and node.target in _PRENORMALIZED else None
        if not (isinstance(weight, fx.Node) and from_constants(weight)):
            continue
        kwargs = dict(node.kwargs)
        gain = kwargs.pop("gain", None)
        if gain is not None and not (isinstance(gain, fx.Node) and from_constants(gain)):
            continue
        w_hat = CF.normalize_weight(
            _evaluate(gm, weight, values), centered=kwargs.get("centered", False), eps=kwargs.get("eps", 1e-6),
            gain=None if gain is None else _evaluate(gm, gain, values),
        )  # fmt: skip
        name = f"_prenormalized_weight_{i}"
        gm.register_buffer(name, w_hat)
        with gm.graph.inserting_before(node):
            node.args = (node.args[0], gm.graph.get_attr(name), *node.args[2:])
        node.target, node.kwargs = _PRENORMALIZED[node.target], kwargs
        done += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return done


def _evaluate(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object]) -> torch.Tensor:
    """The value of ``node``, which derives from ``gm``'s stored tensors alone, computed in torch."""
    if node not in values:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _evaluate(gm, n, values))
        if node.op == "get_attr":
            values[node] = fetch(gm, node.target)
        elif node.op == "call_function":
            values[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # call_module
            values[node] = gm.get_submodule(node.target)(*args, **kwargs)
    return values[node]
