"""The graph rewrite: in a traced network, every dot-product call becomes its cosine twin.

It runs on a GraphModule (:mod:`cosconvert.trace`) whose layer modules the walk
(:mod:`cosconvert.conversion`) has converted already, one pass over its nodes:

- a dot-product functional call (``F.linear``, ``F.conv2d``, ``torch.conv2d``, a linear
  ``torch.addmm`` whose matrix is a weight, as transformers' ``Conv1D`` computes) is pointed at
  its cosine twin (:mod:`cosconvert.calls`), with the gain of the cosine layer owning its
  weight, or a new gain parameter;
- a product of an activation with a weight (``x @ W.T``, ``einsum``, grouped experts'
  ``_grouped_mm``) becomes its cosine twin, with a gain per output unit of the weight; one that is no
  linear map of the activation, and the dot products cosconvert does not convert (transposed
  convolutions, bilinear forms), are listed as skipped with the reason;
- ``F.multi_head_attention_forward``, which makes its projections inside, runs under
  :class:`~cosconvert.calls.CosineCalls`, which sees them;
- a normalizer, as a module or a functional call, goes to :class:`~cosconvert.strip.NormStripper`;
- a plain Python function fx recorded as an opaque leaf runs under
  :class:`~cosconvert.calls.CosineCalls`.
"""

from __future__ import annotations

import builtins
import operator
import types

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cosconvert import functional as CF
from cosconvert.calls import (
    ADDMM,
    PRODUCTS,
    SEE_INSIDE,
    TWINS,
    cosine_addmm,
    is_weight,
    plain_function,
    product,
    scoped_function,
)
from cosconvert.config import CosineConfig
from cosconvert.layers import is_norm
from cosconvert.nn import _CosineMixin
from cosconvert.report import ConversionReport
from cosconvert.selection import EXCLUDED, Selection
from cosconvert.strip import NORM_FUNCTIONS, NormStripper
from cosconvert.trace import attr_owner, fetch, function_name, is_get_attr, join, node_path


class GraphRewriter:
    """The rewrite of one conversion: its settings, its report, and a count of the gains it made."""

    def __init__(
        self,
        report: ConversionReport,
        selected: Selection,
        stripper: NormStripper,
        config: CosineConfig,
    ) -> None:
        self.report, self.selected, self.stripper = report, selected, stripper
        self.config, self.gain = config, config.gain
        self._new_gains = 0

    def rewrite(self, gm: fx.GraphModule, prefix: str, units: int | None = None, in_fallback: bool = False) -> None:
        """Rewrite ``gm``'s calls in place; ``units``: output units of the layer ``gm`` was traced
        from, if it is one (the gain of its functional calls); ``in_fallback``: ``gm`` runs inside
        a module run under CosineCalls, so the calls it leaves plain must be marked so."""
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and is_norm(gm.get_submodule(node.target)):
                self.stripper.strip_node(gm, node, prefix)
            elif node.op == "call_function" and node.target in TWINS:
                self.rewrite_functional(gm, node, prefix, units, in_fallback)
            elif node.op == "call_function" and node.target in ADDMM and _weight_operand(gm, node.args[2:3]):
                self.rewrite_functional(gm, node, prefix, units, in_fallback)
            elif node.op == "call_function" and node.target in NORM_FUNCTIONS:
                self.stripper.strip_function(gm, node, prefix)
            elif _product_target(node) is not None:
                self.rewrite_product(gm, node, prefix, in_fallback)
            elif (
                node.op == "call_function"
                and node.target in UNCONVERTED
                and any(_weight_view(gm, a) is not None for a in _flat(node.args[1:]))
            ):
                self.report.skipped.append({
                    "name": join(prefix, node_path(node)), "type": function_name(node.target),
                    "reason": UNCONVERTED[node.target],
                })  # fmt: skip
            elif node.op == "call_function" and (_is_opaque(node.target) or node.target in SEE_INSIDE):
                self.scope_function(gm, node, prefix)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()

    def rewrite_functional(
        self, gm: fx.GraphModule, node: fx.Node, prefix: str, units: int | None, in_fallback: bool
    ) -> None:
        """Point a dot-product call at its cosine twin, with its gain; one the user excluded stays a
        dot product (marked plain inside a fallback)."""
        name = join(prefix, node_path(node))
        source = function_name(node.target)
        if units is None and not self.selected(name, None):  # a layer's own calls: the layer was selected
            self.report.skipped.append({"name": name, "type": source, "reason": EXCLUDED})
            if in_fallback:  # the fallback's CosineCalls would otherwise take it
                node.target = plain_function(node.target)
            return
        addmm = node.target in ADDMM
        if addmm:
            weight = node.args[2]
        else:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        gain = self.gain_node(gm, node, weight, units, addmm) if self.gain != "none" else None
        node.target = cosine_addmm if addmm else TWINS[node.target]
        node.kwargs = {**node.kwargs, "centered": self.config.centered, "eps": self.config.eps, "gain": gain}
        self.report.converted.append(
            {"name": name, "kind": "functional", "source": source, "target": node.target.__name__}
        )

    def gain_node(self, gm: fx.GraphModule, node: fx.Node, weight, units: int | None, addmm: bool) -> fx.Node | None:
        """The gain for a functional call: its weight's owner's, where the weight is a cosine layer's,
        else a new parameter on ``gm``, one per output unit (of the weight, or of the layer ``gm``
        was traced from) with ``gain="channel"``."""
        owner_path, attr, owner = attr_owner(gm, weight)
        with gm.graph.inserting_before(node):
            if isinstance(owner, _CosineMixin) and attr == "weight" and not addmm:
                return None if owner.gain is None else gm.graph.get_attr(join(owner_path, "gain"))
            count = 1
            if self.gain == "channel":
                if is_get_attr(weight):
                    count = fetch(gm, weight.target).shape[1 if addmm else 0]
                elif units:
                    count = units
        return self.new_gain(gm, node, (count,))

    def rewrite_product(self, gm: fx.GraphModule, node: fx.Node, prefix: str, in_fallback: bool) -> None:
        """Point a product of an activation with a weight at its cosine twin, with a gain shaped like the
        weight operand, its contracted dimensions of size 1. A product that is no linear map of the
        activation is listed as skipped."""
        target = _product_target(node)
        weights = {}
        found = product(
            target, node.args, node.kwargs, lambda n: weights.setdefault(n, _weight_view(gm, n)) is not None
        )
        name = join(prefix, node_path(node))
        if found is None:
            if sum(w is not None for w in weights.values()) == 1:  # a weight, in a product that is no layer
                self.report.skipped.append({
                    "name": name, "type": function_name(target),
                    "reason": "a product with a weight that is no linear map of one input (a sum over one operand alone, or more than two operands)",
                })  # fmt: skip
            return
        if not self.selected(name, None):
            self.report.skipped.append({"name": name, "type": function_name(target), "reason": EXCLUDED})
            if in_fallback:
                node.target = plain_function(target)
            return
        like = weights[found.args[found.weight]]
        gain = None
        if self.gain != "none":
            shape = (1,)
            if self.gain == "channel":
                shape = list(like.shape)
                for d in _weight_contracted(target, node.args, found.weight, like.dim()):
                    shape[d] = 1
            gain = self.new_gain(gm, node, tuple(shape))
        if target is torch.einsum:
            node.target, node.args = CF.cosine_einsum, (node.args[0], *found.args)
        else:
            node.target, node.args = found.twin, tuple(found.args)
        node.kwargs = {
            **found.kwargs,
            "weight": found.weight,
            "centered": self.config.centered,
            "eps": self.config.eps,
            "gain": gain,
        }
        self.report.converted.append(
            {"name": name, "kind": "functional", "source": function_name(target), "target": node.target.__name__}
        )

    def new_gain(self, gm: fx.GraphModule, node: fx.Node, shape: tuple[int, ...]) -> fx.Node:
        """A new gain parameter of ones on ``gm``, read just before ``node``."""
        like = next(gm.parameters(), torch.empty(0))
        name = f"cosine_gain_{self._new_gains}"
        self._new_gains += 1
        gm.register_parameter(name, nn.Parameter(torch.ones(shape, device=like.device, dtype=like.dtype)))
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(name)

    def scope_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """Run an opaque function under CosineCalls, handing it the gains of the cosine weights it gets."""
        pairs = []
        for arg in node.all_input_nodes:
            owner_path, attr, owner = attr_owner(gm, arg)
            if attr == "weight" and isinstance(owner, _CosineMixin) and owner.gain is not None:
                with gm.graph.inserting_before(node):
                    pairs.append((arg, gm.graph.get_attr(join(owner_path, "gain"))))
        name = join(prefix, node_path(node))
        self.report.converted.append({
            "name": name, "kind": "run-time", "source": node.target.__name__,
            "target": "CosineCalls (its F.linear/conv calls, if any)",
        })  # fmt: skip
        node.target = scoped_function(node.target, self.config)
        node.args = (tuple(pairs), *node.args)


# Dot products cosconvert leaves as they are: listed as skipped where they take a weight.
_TRANSPOSED = "transposed convolution: an output sums over scattered inputs, no receptive field"
_RECURRENT = "recurrent layer: its gate dot products run inside one fused op"
UNCONVERTED = {
    F.conv_transpose1d: _TRANSPOSED, F.conv_transpose2d: _TRANSPOSED, F.conv_transpose3d: _TRANSPOSED,
    F.bilinear: "bilinear form x1^T W x2, not a dot product with one input",
    torch.addbmm: "a batched product added to a tensor, not converted",
    # ATen spellings, as in torch.export programs (.pt2)
    torch.ops.aten.conv_transpose1d.default: _TRANSPOSED, torch.ops.aten.conv_transpose2d.input: _TRANSPOSED,
    torch.ops.aten.conv_transpose3d.input: _TRANSPOSED,
    torch.ops.aten.bilinear.default: "bilinear form x1^T W x2, not a dot product with one input",
    torch.ops.aten.gru.input: _RECURRENT, torch.ops.aten.lstm.input: _RECURRENT, torch.ops.aten.rnn_tanh.input: _RECURRENT,
    torch.ops.aten.rnn_relu.input: _RECURRENT,
}  # fmt: skip
_METHOD_PRODUCTS = {"matmul": torch.matmul, "__matmul__": torch.matmul, "mm": torch.mm, "bmm": torch.bmm,
                    "baddbmm": torch.baddbmm}  # fmt: skip
_VIEW_METHODS = {"t", "transpose", "permute", "view", "unsqueeze", "squeeze", "expand", "unflatten", "__getitem__"}
_VIEW_FUNCTIONS = {torch.t, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, operator.getitem}


def _product_target(node: fx.Node):
    """The torch function of a matmul / einsum / grouped-product node (a method call mapped to it), else None."""
    if node.op == "call_function" and node.target in PRODUCTS:
        return node.target
    if node.op == "call_method" and node.target in _METHOD_PRODUCTS:
        return _METHOD_PRODUCTS[node.target]
    return None


def _weight_view(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """A meta tensor shaped like ``node``'s value where it is a parameter or a view of one (``W.T``,
    ``W.transpose(-2, -1)``, ``W[0]``), else None."""
    if is_get_attr(node):
        t = fetch(gm, node.target)
        return torch.empty(t.shape, device="meta") if is_weight(t) and t.dim() >= 2 else None
    if not isinstance(node, fx.Node) or not node.args:
        return None
    view = node.op == "call_method" and node.target in _VIEW_METHODS
    view |= node.op == "call_function" and (
        node.target in _VIEW_FUNCTIONS or (node.target is builtins.getattr and node.args[1] in ("T", "mT"))
    )
    if not view:
        return None
    base = _weight_view(gm, node.args[0])
    rest = node.args[1:]
    if base is None or any(isinstance(a, fx.Node) for a in _flat(rest)) or node.kwargs:
        return None
    try:
        if node.op == "call_method":
            return getattr(base, node.target)(*rest)
        return node.target(base, *rest)
    except Exception:  # noqa: BLE001 - a view that does not replay on a meta tensor: not taken as a weight
        return None


def _flat(args) -> list:
    out = []
    fx.node.map_aggregate(args, out.append)
    return out


def _weight_contracted(target, args, weight: int, rank: int) -> tuple[int, ...]:
    """The dimensions of the weight operand that ``target`` contracts, counted from the end."""
    if target is torch.einsum:
        dims = CF.contracted_dims(args[0], [rank if i == weight else -1 for i in range(2)])
        return dims[weight]
    if weight == 0:  # the left operand's last dimension (matmul, grouped products)
        return (-1,)
    return (-2,) if rank > 1 else (-1,)


def _weight_operand(gm: fx.GraphModule, args) -> bool:
    """True if ``args`` is one ``get_attr`` of a parameter (a view of one counts): addmm's matrix."""
    if not args or not is_get_attr(args[0]):
        return False
    return is_weight(fetch(gm, args[0].target))


def _is_opaque(target) -> bool:
    """A plain Python function fx recorded as a leaf (``torch.fx.wrap``), outside torch."""
    package = (target.__module__ or "").split(".")[0] if isinstance(target, types.FunctionType) else "torch"
    return package not in ("torch", "cosconvert")
