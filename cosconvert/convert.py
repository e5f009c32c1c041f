"""``convert(model)``: the torch.fx pass that turns a network into its cosine-normalized twin.

The original is first run once on example inputs (the user's, or inputs inferred from its
first layer), keeping what each module receives (:mod:`cosconvert.capture`). The pass then
traces the model with fx, treating linear, conv, attention and normalization layers as
leaves, checks the graph against the module on those inputs, and:

1. swaps every ``nn.Linear`` / ``nn.ConvNd`` / ``nn.MultiheadAttention`` that keeps its torch
   forward for its :mod:`cosconvert.nn` twin, with a copy of its weights; a subclass with a
   forward of its own (same-padding, weight standardization, LoRA) is traced on its own, so
   its calls are rewritten on the operands they really receive;
2. points every functional call (``F.linear``, ``F.conv2d``, ``torch.conv2d``, a linear
   ``torch.addmm``, ...) at its cosine twin;
3. strips the normalizers on the activation path when asked (``"drop"``, or ``"fold"`` their
   affine into the layer before them); a normalizer of a weight is that weight's transform;
4. runs functions fx records as opaque leaves under :class:`~cosconvert.calls.CosineCalls`.

A module that cannot be traced (data-dependent control flow, unsupported Python), whose graph
disagrees with it, or whose forward takes optional inputs (a graph would fix which are given)
is converted by fallback: each child is converted on its own and the module's own forward
runs under :class:`~cosconvert.calls.CosineCalls`. Finally the converted model runs once on
the example inputs under :class:`~cosconvert.calls.DotProductCalls`, and the report lists the
layers as they really ran.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect as pyinspect
import traceback
import types
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from cosconvert.calls import (
    ADDMM,
    TWINS,
    cosine_addmm,
    is_weight,
    plain_class,
    plain_function,
    scoped_class,
    scoped_function,
)
from cosconvert.capture import Capture, example_batch, optional_inputs
from cosconvert.layers import LAYERS, LEAVES, UNCONVERTIBLE, is_done, is_leaf, is_norm, out_units, own_forward
from cosconvert.nn import (
    GAINS,
    CosineMultiheadAttention,
    _CosineMixin,
)
from cosconvert.report import ConversionReport
from cosconvert.strip import NORM_FUNCTIONS, STRIP_MODES, Affine, NormStripper
from cosconvert.trace import (
    attr_owner,
    fetch,
    graft,
    is_get_attr,
    join,
    node_path,
    trace,
)
from cosconvert.verify import verify

__all__ = ["convert", "inspect", "Affine", "STRIP_MODES"]

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
    def __init__(
        self, report: ConversionReport, capture: Capture, centered, strip_norms, include, exclude, gain, eps
    ) -> None:
        self.report, self.capture = report, capture
        self.centered, self.gain, self.eps = centered, gain, eps
        self.stripper = NormStripper(strip_norms, report)
        self.include, self.exclude = include, exclude
        self._new_gains = 0
        self._in_fallback = 0  # > 0 while converting the children of a module run under CosineCalls

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

    def _skip(self, name: str, kind: str, reason: str) -> None:
        self.report.skipped.append({"name": name, "type": kind, "reason": reason})

    # -- modules ------------------------------------------------------------------------------
    def run(self, module: nn.Module, path: str, root: bool = False) -> nn.Module:
        """The converted ``module``: a new GraphModule at the root, else ``module`` changed in place
        (its class kept, so the Python around it still finds its attributes), or its twin."""
        if is_norm(module):
            return self.stripper.strip_leaf(module, path)
        if is_done(module):
            return module
        if isinstance(module, LEAVES) and not own_forward(module):
            return self.swap(module, path)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            self.convert_children(module, path)
            return module
        if own_forward(module) and not self.selected(path, module):
            self._skip(path, type(module).__name__, "excluded by include/exclude")
            if self._in_fallback:  # its calls would otherwise meet the fallback's CosineCalls
                module.__class__ = plain_class(type(module))
            return module
        optional = optional_inputs(module)
        if optional:
            reason = (
                f"its forward takes optional inputs ({', '.join(f'{n}=None' for n in optional)}): "
                "a traced graph would fix which of them are given"
            )
            return self.fallback(module, path, reason, _forward_location(module))
        try:
            gm = trace(module)
        except Exception as err:  # noqa: BLE001 - any failure to trace means fallback
            return self.fallback(module, path, _reason(err), _user_location(err))
        mismatch = self.capture.check(gm, module)
        if mismatch is not None:
            return self.fallback(module, path, mismatch, _forward_location(module))
        self.rewrite(gm, path, out_units(module))
        return gm if root else graft(module, gm)

    def swap(self, m: nn.Module, name: str) -> nn.Module:
        """``m``'s cosine twin, or ``m`` itself (reported) where it cannot or should not be converted."""
        for base, reason in UNCONVERTIBLE.items():
            if isinstance(m, base):
                self._skip(name, type(m).__name__, reason)
                return m
        twin_cls = next((twin for base, twin in LAYERS.items() if isinstance(m, base)), None)
        if twin_cls is None:
            return m
        if not self.selected(name, m):
            self._skip(name, type(m).__name__, "excluded by include/exclude")
            return m
        try:
            twin = twin_cls.from_module(m, centered=self.centered, gain=self.gain, eps=self.eps)
        except (NotImplementedError, TypeError) as err:
            self._skip(name, type(m).__name__, str(err))
            return m
        kind = "attention" if twin_cls is CosineMultiheadAttention else "module"
        self.report.converted.append(
            {"name": name, "kind": kind, "source": type(m).__name__, "target": twin_cls.__name__}
        )
        return twin

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.run(child, join(path, name))
            if new is not child:
                setattr(module, name, new)

    def fallback(self, module: nn.Module, path: str, reason: str, location: str) -> nn.Module:
        """``module`` with its children converted on their own and its forward run under CosineCalls."""
        self.report.fallbacks.append({
            "name": path or "<root>", "reason": reason, "location": location,
            "limits": "its own F.linear/conv calls run as cosine at run time"
            + ("" if own_forward(module) else " without gain")
            + "; its functional normalizers are kept; nothing folded",
        })  # fmt: skip
        # Calls on the weights of layers left as dot products stay plain under the fallback's CosineCalls.
        module._cosine_plain = tuple(
            join(owner, pname)
            for owner, m in module.named_modules()
            for pname, _ in m.named_parameters(recurse=False)
            if isinstance(m, tuple(UNCONVERTIBLE)) or not self.selected(join(path, owner), m)
        )
        self._in_fallback += 1
        try:
            self.convert_children(module, path)
        finally:
            self._in_fallback -= 1
        if own_forward(module):  # a layer: its calls are its own, with its gain
            units = out_units(module) if self.gain == "channel" else 1
            if self.gain != "none" and units:
                like = module.weight
                module.register_parameter(
                    "cosine_gain", nn.Parameter(torch.ones(units, device=like.device, dtype=like.dtype))
                )
            self.report.converted.append({
                "name": path, "kind": "run-time", "source": type(module).__name__,
                "target": "CosineCalls (its forward, with its own padding and weight transform)",
            })  # fmt: skip
        module._cosine_settings = (self.centered, self.eps)
        module.__class__ = scoped_class(type(module))
        return module

    # -- graph ---------------------------------------------------------------------------------
    def rewrite(self, gm: fx.GraphModule, prefix: str, units: int | None = None) -> None:
        """Convert ``gm``'s layers and calls in place; ``units``: output units of the layer ``gm``
        was traced from, if it is one (the gain of its functional calls)."""
        for name, m in list(gm.named_modules()):
            if name and is_leaf(m) and not is_norm(m) and not _inside_leaf(gm, name):
                new = self.run(m, join(prefix, name))
                if new is not m:
                    gm.set_submodule(name, new)
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and is_norm(gm.get_submodule(node.target)):
                self.stripper.strip_node(gm, node, prefix)
            elif node.op == "call_function" and node.target in TWINS:
                self.rewrite_functional(gm, node, prefix, units)
            elif node.op == "call_function" and node.target in ADDMM and _weight_operand(gm, node.args[2:3]):
                self.rewrite_functional(gm, node, prefix, units)
            elif node.op == "call_function" and node.target in NORM_FUNCTIONS:
                self.stripper.strip_function(gm, node, prefix)
            elif node.op == "call_function" and _is_opaque(node.target):
                self.scope_function(gm, node, prefix)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()

    def rewrite_functional(self, gm: fx.GraphModule, node: fx.Node, prefix: str, units: int | None) -> None:
        name = join(prefix, node_path(node))
        source = getattr(node.target, "__name__", str(node.target))
        if units is None and not self.selected(name, None):  # a layer's own calls: the layer was selected
            self._skip(name, source, "excluded by include/exclude")
            if self._in_fallback:  # the fallback's CosineCalls would otherwise take it
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


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _forward_location(module: nn.Module) -> str:
    """Where ``module``'s forward is defined."""
    forward = type(module).forward
    try:
        return f"{pyinspect.getsourcefile(forward)}:{pyinspect.getsourcelines(forward)[1]} in {forward.__qualname__}"
    except (OSError, TypeError):
        return forward.__qualname__


def _inside_leaf(gm: nn.Module, name: str) -> bool:
    """True for a module nested in a leaf layer (an attention's out_proj): its parent converts it."""
    parts = name.split(".")
    return any(is_leaf(gm.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


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
    example_inputs: tuple | dict | torch.Tensor | None = None,
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
        example_inputs: inputs to check the conversion on (a tuple of positional inputs, a
            tensor, or a dict of keyword inputs); else the first calibration batch, else inputs
            inferred from the first layer. Every traced graph is compared with its module on
            them (a graph that disagrees is not used: fallback), the converted model's layer
            calls are checked at run time where something runs by fallback, and, for
            ``example_inputs``, the output shapes of both models are compared.
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
    if calibration_data is not None and iter(calibration_data) is calibration_data:
        calibration_data = list(calibration_data)  # a one-pass iterator: its first batch is read twice
    work = copy.deepcopy(model)
    watched = [m for m in work.modules() if not is_leaf(m) or own_forward(m)]
    batch = example_batch(example_inputs, calibration_data)
    capture = Capture(work, batch, watched)
    passes = _Pass(report, capture, centered, strip_norms, include, exclude, gain, eps)
    converted = passes.run(work, "", root=True)
    report.parameters = {"original": _count(model), "converted": _count(converted)}
    report.checks = {
        "inputs": capture.source
        or "none: no example inputs given, and none inferred from its first layer that it runs on; "
        "pass example_inputs to check its graphs and layers",
        "graphs checked": capture.checked,
        "graphs that disagreed (converted by fallback)": capture.disagreed,
    }
    if not report.fallbacks and all(row["kind"] != "run-time" for row in report.converted):
        report.checks["run-time check"] = "not needed: no fallback, every layer call is a node of the graph"
    elif capture.example is not None:
        verify(converted, report, *capture.example)
    _attach(converted, report)
    if example_inputs is not None:
        _check_outputs(model, converted, batch[0], batch[1])
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


def _check_outputs(model: nn.Module, converted: nn.Module, args: tuple, kwargs: dict) -> None:
    with torch.no_grad():
        ref, out = model(*args, **kwargs), converted(*args, **kwargs)
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
