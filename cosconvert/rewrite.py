"""The graph rewrite: in a traced network, every dot-product call becomes its cosine twin.

It runs on a GraphModule (:mod:`cosconvert.trace`) whose layer modules the walk
(:mod:`cosconvert.convert`) has converted already, one pass over its nodes:

- a dot-product functional call (``F.linear``, ``F.conv2d``, ``torch.conv2d``, a linear
  ``torch.addmm`` whose matrix is a weight, as transformers' ``Conv1D`` computes) is pointed at
  its cosine twin (:mod:`cosconvert.calls`), with the gain of the cosine layer owning its
  weight, or a new gain parameter;
- a normalizer, as a module or a functional call, goes to :class:`~cosconvert.strip.NormStripper`;
- a plain Python function fx recorded as an opaque leaf runs under
  :class:`~cosconvert.calls.CosineCalls`.
"""

from __future__ import annotations

import types

import torch
import torch.fx as fx
from torch import nn

from cosconvert.calls import ADDMM, TWINS, cosine_addmm, is_weight, plain_function, scoped_function
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
        centered: bool,
        gain: str,
        eps: float,
    ) -> None:
        self.report, self.selected, self.stripper = report, selected, stripper
        self.centered, self.gain, self.eps = centered, gain, eps
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
            elif node.op == "call_function" and _is_opaque(node.target):
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
        node.kwargs = {**node.kwargs, "centered": self.centered, "eps": self.eps, "gain": gain}
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
            like = next(gm.parameters(), torch.empty(0))
            name = f"cosine_gain_{self._new_gains}"
            self._new_gains += 1
            gm.register_parameter(name, nn.Parameter(torch.ones(count, device=like.device, dtype=like.dtype)))
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
        node.target = scoped_function(node.target, self.centered, self.eps)
        node.args = (tuple(pairs), *node.args)


def _weight_operand(gm: fx.GraphModule, args) -> bool:
    """True if ``args`` is one ``get_attr`` of a parameter (a view of one counts): addmm's matrix."""
    if not args or not is_get_attr(args[0]):
        return False
    return is_weight(fetch(gm, args[0].target))


def _is_opaque(target) -> bool:
    """A plain Python function fx recorded as a leaf (``torch.fx.wrap``), outside torch."""
    package = (target.__module__ or "").split(".")[0] if isinstance(target, types.FunctionType) else "torch"
    return package not in ("torch", "cosconvert")
