"""``convert(model)``: the torch.fx pass that turns a network into its cosine-normalized twin.

The pass traces the model with fx, treating linear, conv, attention and normalization
layers as leaves, and then:

1. swaps every ``nn.Linear`` / ``nn.ConvNd`` / ``nn.MultiheadAttention`` (subclasses too)
   for its :mod:`cosconvert.nn` twin, with a copy of its weights;
2. points every functional call (``F.linear``, ``F.conv2d``, ``torch.conv2d``, ...) at its
   :mod:`cosconvert.functional` twin;
3. strips the normalizers when asked (``"drop"``, or ``"fold"`` their affine into the layer
   before them);
4. runs functions fx records as opaque leaves under :class:`~cosconvert.calls.CosineCalls`.

A module that cannot be traced (data-dependent control flow, unsupported Python) is
converted by fallback: each child is converted on its own and the module's own forward
runs under :class:`~cosconvert.calls.CosineCalls`. The report says where and what that cost.
"""

from __future__ import annotations

import copy
import fnmatch
import traceback
import types
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from cosconvert.calls import TWINS, scoped_class, scoped_function
from cosconvert.nn import (
    GAINS,
    CosineConv1d,
    CosineConv2d,
    CosineConv3d,
    CosineLinear,
    CosineMultiheadAttention,
    _CosineMixin,
)
from cosconvert.report import ConversionReport

__all__ = ["convert", "inspect", "Affine", "STRIP_MODES"]

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
# Linear-like layers the pass leaves as they are, and why. Checked before LAYERS (LazyLinear is a Linear).
UNCONVERTIBLE = {
    nn.modules.lazy.LazyModuleMixin: "lazy layer, not initialized: run one forward before converting",
    nn.modules.conv._ConvTransposeNd: "transposed convolution: an output sums over scattered inputs, no receptive field",
    nn.RNNBase: "recurrent layer: its gate dot products run inside one fused op",
    nn.Bilinear: "bilinear form x1^T W x2, not a dot product with one input",
}
LEAVES = (*LAYERS, *UNCONVERTIBLE, _CosineMixin)
_NORM_FORWARDS = {cls.forward for cls in (*NORMS, nn.SyncBatchNorm)}


def _is_norm(m: nn.Module) -> bool:
    """A normalizer with its torch forward. A subclass with its own forward (torchvision's
    channels-first LayerNorm2d) is traced through instead, so its functional call is seen."""
    return isinstance(m, NORMS) and type(m).forward in _NORM_FORWARDS


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, LEAVES) or _is_norm(m)


STRIP_MODES = (False, "drop", "fold")

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
}


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


class _Tracer(fx.Tracer):
    """fx's tracer, but it traces into torch.nn containers (transformer layers) and stops at the
    layers the pass rewrites."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_leaf(m):
            return True
        if next(m.children(), None) is not None:
            return False
        return super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.GraphModule:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the transformer layers' fast-path checks are untraceable
    try:
        graph = _Tracer().trace(module)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return fx.GraphModule(module, graph, type(module).__name__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _norm_channel_dim(norm: nn.Module) -> int:
    return -1 if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)) else 1


def _user_location(err: BaseException) -> str:
    """The innermost frame of the user's own code in ``err``'s traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    outside_fx = [f for f in frames if "/torch/fx/" not in f.filename.replace("\\", "/")]
    user = [
        f for f in outside_fx if "/torch/" not in f.filename.replace("\\", "/") and "/cosconvert/" not in f.filename
    ]
    frame = (user or outside_fx or [None])[-1]
    return (
        "unknown" if frame is None else f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    )


class _Pass:
    def __init__(self, report: ConversionReport, centered, strip_norms, include, exclude, gain, eps) -> None:
        self.report = report
        self.centered, self.strip, self.gain, self.eps = centered, strip_norms, gain, eps
        self.include, self.exclude = include, exclude
        self._new_gains = 0

    # -- selection ---------------------------------------------------------------------------
    def selected(self, name: str, module: nn.Module | None) -> bool:
        def matches(patterns) -> bool:
            return any(
                fnmatch.fnmatchcase(name, p) if isinstance(p, str) else module is not None and isinstance(module, p)
                for p in patterns
            )

        if self.include is not None and not matches(self.include):
            return False
        return not (self.exclude is not None and matches(self.exclude))

    # -- modules ------------------------------------------------------------------------------
    def run(self, module: nn.Module, path: str) -> nn.Module:
        """The converted ``module`` (a new GraphModule, or ``module`` changed in place)."""
        if _is_norm(module):
            return self.strip_leaf(module, path)
        if isinstance(module, LEAVES):
            return self.swap(module, path)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            self.convert_children(module, path)
            return module
        try:
            gm = _trace(module)
        except Exception as err:  # noqa: BLE001 - any failure to trace means fallback
            return self.fallback(module, path, err)
        self.rewrite(gm, path)
        return gm

    def swap(self, m: nn.Module, name: str) -> nn.Module:
        """``m``'s cosine twin, or ``m`` itself (reported) where it cannot or should not be converted."""
        if isinstance(m, _CosineMixin):
            return m
        for base, reason in UNCONVERTIBLE.items():
            if isinstance(m, base):
                self.report.skipped.append({"name": name, "type": type(m).__name__, "reason": reason})
                return m
        twin_cls = next((twin for base, twin in LAYERS.items() if isinstance(m, base)), None)
        if twin_cls is None:
            return m
        if not self.selected(name, m):
            self.report.skipped.append(
                {"name": name, "type": type(m).__name__, "reason": "excluded by include/exclude"}
            )
            return m
        try:
            twin = twin_cls.from_module(m, centered=self.centered, gain=self.gain, eps=self.eps)
        except (NotImplementedError, TypeError) as err:
            self.report.skipped.append({"name": name, "type": type(m).__name__, "reason": str(err)})
            return m
        kind = "attention" if twin_cls is CosineMultiheadAttention else "module"
        self.report.converted.append(
            {"name": name, "kind": kind, "source": type(m).__name__, "target": twin_cls.__name__}
        )
        return twin

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.run(child, _join(path, name))
            if new is not child:
                setattr(module, name, new)

    def fallback(self, module: nn.Module, path: str, err: Exception) -> nn.Module:
        self.report.fallbacks.append({
            "name": path or "<root>",
            "reason": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
            "location": _user_location(err),
            "limits": "its own F.linear/conv calls run as cosine at run time without gain; "
            "its functional normalizers are kept; nothing folded",
        })  # fmt: skip
        self.convert_children(module, path)
        module._cosine_settings = (self.centered, self.eps)
        module.__class__ = scoped_class(type(module))
        return module

    # -- graph ---------------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, prefix: str) -> None:
        for name, m in list(gm.named_modules()):
            if name and not _inside_leaf(gm, name):
                new = m if _is_norm(m) else self.swap(m, _join(prefix, name))
                if new is not m:
                    gm.set_submodule(name, new)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and _is_norm(gm.get_submodule(node.target)):
                self.strip_node(gm, node, prefix)
            elif node.op == "call_function" and node.target in TWINS:
                self.rewrite_functional(gm, node, prefix)
            elif node.op == "call_function" and node.target in NORM_FUNCTIONS:
                self.strip_function(gm, node, prefix)
            elif node.op == "call_function" and _is_opaque(node.target):
                self.scope_function(gm, node, prefix)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()

    def rewrite_functional(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        name = _join(prefix, _node_path(node))
        if not self.selected(name, None):
            self.report.skipped.append(
                {"name": name, "type": node.target.__name__, "reason": "excluded by include/exclude"}
            )
            return
        weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        gain = self.gain_node(gm, node, weight) if self.gain != "none" else None
        source = node.target.__name__
        node.target = TWINS[node.target]
        node.kwargs = {**node.kwargs, "centered": self.centered, "eps": self.eps, "gain": gain}
        self.report.converted.append(
            {"name": name, "kind": "functional", "source": source, "target": node.target.__name__}
        )

    def gain_node(self, gm: fx.GraphModule, node: fx.Node, weight) -> fx.Node | None:
        """The gain for a functional call: its weight's owner's, where the weight is a cosine layer's,
        else a new parameter on ``gm`` (one per output unit where the weight's shape is known)."""
        owner_path, attr, owner = _owner(gm, weight)
        with gm.graph.inserting_before(node):
            if isinstance(owner, _CosineMixin) and attr == "weight":
                return None if owner.gain is None else gm.graph.get_attr(_join(owner_path, "gain"))
            units = 1
            if _is_get_attr(weight) and self.gain == "channel":
                units = _fetch(gm, weight.target).shape[0]
            like = next(gm.parameters(), torch.empty(0))
            name = f"cosine_gain_{self._new_gains}"
            self._new_gains += 1
            gm.register_parameter(name, nn.Parameter(torch.ones(units, device=like.device, dtype=like.dtype)))
            return gm.graph.get_attr(name)

    def scope_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        """Run an opaque function under CosineCalls, handing it the gains of the cosine weights it gets."""
        pairs = []
        for arg in node.all_input_nodes:
            owner_path, attr, owner = _owner(gm, arg)
            if attr == "weight" and isinstance(owner, _CosineMixin) and owner.gain is not None:
                with gm.graph.inserting_before(node):
                    pairs.append((arg, gm.graph.get_attr(_join(owner_path, "gain"))))
        name = _join(prefix, _node_path(node))
        self.report.converted.append({
            "name": name, "kind": "run-time", "source": node.target.__name__,
            "target": "CosineCalls (its F.linear/conv calls, if any)",
        })  # fmt: skip
        node.target = scoped_function(node.target, self.centered, self.eps)
        node.args = (tuple(pairs), *node.args)

    # -- normalizers ----------------------------------------------------------------------------
    def strip_leaf(self, norm: nn.Module, name: str) -> nn.Module:
        """A normalizer outside any graph: dropped, or its affine kept (nothing to fold into)."""
        if not self.strip:
            return norm
        if self.strip == "fold" and getattr(norm, "weight", None) is not None:
            self._stripped(name, norm, "kept as affine (no graph to fold through)")
            return Affine(norm.weight, getattr(norm, "bias", None), _norm_channel_dim(norm))
        self._stripped(name, norm, "dropped")
        return nn.Identity()

    def strip_node(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        if not self.strip:
            return
        norm = gm.get_submodule(node.target)
        name = _join(prefix, node.target)
        source = node.args[0]
        layer = gm.get_submodule(source.target) if source.op == "call_module" else None
        if isinstance(layer, _CosineMixin) and len(source.users) == 1:  # calibration's target: layer's bias, then norm
            bias = None if layer.bias is None else layer.bias.detach().clone()
            object.__setattr__(layer, "_stripped_norm", (bias, copy.deepcopy(norm).eval()))
        weight = getattr(norm, "weight", None)
        if self.strip == "fold" and weight is not None:
            reason = _cannot_fold(layer, norm, source)
            if reason is None:
                _fold(layer, norm)
                self._stripped(name, norm, f"folded into {_join(prefix, source.target)}")
            else:
                gm.set_submodule(node.target, Affine(weight, getattr(norm, "bias", None), _norm_channel_dim(norm)))
                self._stripped(name, norm, f"kept as affine ({reason})")
                return
        else:
            self._stripped(name, norm, "dropped")
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)

    def strip_function(self, gm: fx.GraphModule, node: fx.Node, prefix: str) -> None:
        if not self.strip:
            return
        w_at, b_at, channel_dim = NORM_FUNCTIONS[node.target]

        def arg(index, key):
            if index is None:
                return None
            return node.args[index] if len(node.args) > index else node.kwargs.get(key)

        weight, bias = arg(w_at, "weight"), arg(b_at, "bias")
        name = _join(prefix, _node_path(node))
        if self.strip == "fold" and (weight is not None or bias is not None):
            node.target, node.args, node.kwargs = affine, (node.args[0], weight, bias, channel_dim), {}
            self._stripped(name, node.name, "kept as affine (functional)")
            return
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        self._stripped(name, node.name, "dropped")

    def _stripped(self, name: str, norm, action: str) -> None:
        kind = norm if isinstance(norm, str) else type(norm).__name__
        self.report.stripped.append({"name": name, "type": kind, "action": action})


def _cannot_fold(layer, norm: nn.Module, source: fx.Node) -> str | None:
    """Why ``norm``'s affine cannot be folded into ``layer``, or None if it can."""
    if not isinstance(layer, (CosineLinear, CosineConv1d, CosineConv2d, CosineConv3d)):
        return "not directly after a cosine layer"
    if len(source.users) != 1:
        return "the layer's output has other users"
    if norm.weight.numel() != layer.weight.shape[0]:
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
    gamma, beta = norm.weight.detach(), getattr(norm, "bias", None)
    if layer.gain is None or layer.gain.numel() == 1:
        layer.set_gain("channel")
    with torch.no_grad():
        bias = layer.bias if layer.bias is not None else torch.zeros_like(gamma)
        layer.gain.mul_(gamma)
        shifted = gamma * bias + (0 if beta is None else beta.detach())
        layer.bias = nn.Parameter(shifted.to(layer.weight.dtype))


def _is_get_attr(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _owner(gm: fx.GraphModule, node) -> tuple[str, str, nn.Module | None]:
    """For a ``get_attr`` node of ``a.b.weight``: ("a.b", "weight", the module a.b); else ("", "", None)."""
    if not _is_get_attr(node):
        return "", "", None
    owner_path, _, attr = node.target.rpartition(".")
    return owner_path, attr, gm.get_submodule(owner_path)


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a ``get_attr`` target names (``"a.b.weight"``)."""
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _node_path(node: fx.Node) -> str:
    """``module.path.node_name``: where in the model a functional call sits."""
    stack = node.meta.get("nn_module_stack") or {}
    module_path = next(reversed(stack.values()))[0] if stack else ""
    return _join(module_path, node.name)


def _inside_leaf(gm: nn.Module, name: str) -> bool:
    """True for a module nested in a leaf layer (an attention's out_proj): its parent converts it."""
    parts = name.split(".")
    return any(_is_leaf(gm.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def _is_opaque(target) -> bool:
    """A plain Python function fx recorded as a leaf (``torch.fx.wrap``), outside torch."""
    package = (target.__module__ or "").split(".")[0] if isinstance(target, types.FunctionType) else "torch"
    return package not in ("torch", "cosconvert")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convert(
    model: nn.Module,
    *,
    centered: bool = False,
    strip_norms: bool | str = False,
    include: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] | None = None,
    gain: str = "channel",
    eps: float = 1e-6,
    example_inputs: tuple | None = None,
    calibration_data: Iterable | None = None,
) -> nn.Module:
    """The cosine-normalized twin of ``model``; ``model`` itself is left unchanged.

    Args:
        centered: Pearson correlation instead of cosine.
        strip_norms: ``False`` keeps BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm;
            ``"drop"`` removes them; ``"fold"`` removes them but keeps their learned scale
            and shift, folded into the cosine layer they directly follow, else as an
            :class:`Affine`.
        include, exclude: fully-qualified-name globs (``"fc"``, ``"layer4.*"``) or module
            types; functional calls are named ``module.path.node_name``.
        gain: ``"channel"`` (default: a learned gain per output unit, so the converted net
            can reach the scales its activations and logits need), ``"scalar"`` or ``"none"``
            (the paper's exact form).
        eps: floor of each norm.
        example_inputs: if given, both models run on them and the output shapes are checked.
        calibration_data: if given, an iterable of input batches on which each cosine layer's
            gain and bias are fitted to the original layer's outputs (:func:`calibrate`).

    Returns the converted module, with its :class:`ConversionReport` as ``.cosine_report``
    (also given by :func:`cosconvert.report_of`).
    """
    if strip_norms not in STRIP_MODES:
        raise ValueError(f"strip_norms must be one of {STRIP_MODES}, got {strip_norms!r}")
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    settings = {
        "centered": centered, "strip_norms": strip_norms, "gain": gain, "eps": eps,
        "include": _names(include), "exclude": _names(exclude),
    }  # fmt: skip
    report = ConversionReport(settings=settings)
    converted = _Pass(report, centered, strip_norms, include, exclude, gain, eps).run(copy.deepcopy(model), "")
    report.parameters = {"original": _count(model), "converted": _count(converted)}
    _attach(converted, report)
    if example_inputs is not None:
        _check_outputs(model, converted, example_inputs)
    if calibration_data is not None:
        from cosconvert.calibration import calibrate

        calibrate(converted, model, calibration_data)
    return converted


def _names(patterns) -> list[str] | None:
    if patterns is None:
        return None
    return [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in patterns]


def _attach(converted: nn.Module, report: ConversionReport) -> None:
    converted.cosine_report = report
    if isinstance(converted, fx.GraphModule):  # survive GraphModule's deepcopy, which rebuilds from the graph
        preserved = converted.meta.setdefault(fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY, {})
        preserved["cosine_report"] = report


def _check_outputs(model: nn.Module, converted: nn.Module, example_inputs: tuple) -> None:
    with torch.no_grad():
        ref, out = model(*example_inputs), converted(*example_inputs)
    ref_shapes = [t.shape for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    out_shapes = [t.shape for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if ref_shapes != out_shapes:
        raise RuntimeError(f"converted model's outputs {out_shapes} differ in shape from the original's {ref_shapes}")


def report_of(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`convert`."""
    report = getattr(model, "cosine_report", None)
    if report is None:
        raise ValueError("this model was not made by cosconvert.convert (it has no cosine_report)")
    return report


def inspect(model: nn.Module, **kwargs) -> ConversionReport:
    """What :func:`convert` would do to ``model`` with these arguments, changing nothing."""
    kwargs.pop("calibration_data", None)
    return report_of(convert(model, **kwargs))
