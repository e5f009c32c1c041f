"""A network's fx graph as the converter sees it, and the helpers to read and graft one.

The tracer stops at the leaves of :mod:`cosconvert.layers` (layers, normalizers, modules
converted already) and traces into everything else, torch's own containers included. The
helpers name a graph's nodes, fetch the tensors its ``get_attr`` nodes stand for, tell weights
from activations, and graft a rewritten graph back into the module it was traced from.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from cosconvert.layers import is_leaf, is_norm


class Tracer(fx.Tracer):
    """fx's tracer, but it traces into torch.nn containers (transformer layers) and stops at the
    layers the converter rewrites."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf(m):
            return True
        if next(m.children(), None) is not None:
            return False
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> fx.GraphModule:
    """``module`` as a GraphModule; raises whatever fx raises where it cannot trace. A graph that
    ``torch.export`` made (its nodes know their source modules) is copied, not traced again, so its
    calls keep the names of the modules they came from."""
    if isinstance(module, fx.GraphModule) and any("nn_module_stack" in n.meta for n in module.graph.nodes):
        graph = fx.Graph()
        graph._codegen = copy.deepcopy(module.graph._codegen)  # the program's own input and output packing
        graph.output(graph.graph_copy(module.graph, {}))
        return fx.GraphModule(module, graph, type(module).__name__)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the transformer layers' fast-path checks are untraceable
    try:
        graph = Tracer().trace(module)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return fx.GraphModule(module, graph, type(module).__name__)


def join(prefix: str, name: str) -> str:
    """A qualified name: ``join("layer1", "0.conv1")`` is ``"layer1.0.conv1"``."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def node_path(node: fx.Node) -> str:
    """``module.path.node_name``: where in the model a functional call sits."""
    stack = node.meta.get("nn_module_stack") or {}
    module_path = next(reversed(stack.values()))[0] if stack else ""
    return join(module_path, node.name)


def function_name(target) -> str:
    return getattr(target, "__name__", str(target))


def is_get_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names (``"a.b.weight"``)."""
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def attr_owner(gm: fx.GraphModule, node) -> tuple[str, str, nn.Module | None]:
    """For a ``get_attr`` node of ``a.b.weight``: ("a.b", "weight", the module a.b); else ("", "", None)."""
    if not is_get_attr(node):
        return "", "", None
    owner_path, _, attr = node.target.rpartition(".")
    return owner_path, attr, gm.get_submodule(owner_path)


def from_constants(node) -> bool:
    """True if ``node``'s value derives from parameters and constants alone, not from the inputs:
    a normalizer over it (StdConv's ``batch_norm`` over its weight) transforms a weight."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        todo.extend(n.all_input_nodes)
    return True


def graft(module: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``module`` running ``gm``'s code as its forward, with ``gm``'s converted submodules and new
    attributes (gains) set in it: its class, attributes and methods stay, so a parent run by
    fallback still finds them (``self.attn.resolution``). A normalizer the rewrite took out of the
    graph (stripped) becomes an ``nn.Identity`` here too, so that ``print(model)`` shows what runs."""
    kept = dict(gm.named_modules())
    for name, sub in kept.items():
        # fx holds the containers on the way to a called module as bare nn.Module()s: the real ones stay
        if name and type(sub) is not nn.Module and module.get_submodule(name) is not sub:
            module.set_submodule(name, sub)
    for name, sub in list(module.named_modules()):
        if name and name not in kept and is_norm(sub):
            module.set_submodule(name, nn.Identity())
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, attr = node.target.rpartition(".")
        value, holder = fetch(gm, node.target), module.get_submodule(owner_path)
        if getattr(holder, attr, None) is value:
            continue
        if isinstance(value, nn.Parameter):
            holder.register_parameter(attr, value)
        elif attr in gm.get_submodule(owner_path)._buffers:
            holder.register_buffer(attr, value)
        else:
            setattr(holder, attr, value)
    cls = type(module)
    module.__class__ = type(cls.__name__, (cls,), {
        "forward": type(gm).forward, "__module__": cls.__module__, "_cosine_graph": True,
    })  # fmt: skip
    return module
