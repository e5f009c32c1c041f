"""``convert(model)``: a network's cosine-normalized twin, made by a walk over its modules.

The original is first run once on example inputs (the user's, or inputs inferred from its
first layer), keeping what each module receives (:mod:`cosconvert.capture`). The walk then
goes down the module tree from the root:

1. a layer of :mod:`cosconvert.layers` that keeps its torch forward (``nn.Linear`` /
   ``nn.ConvNd`` / ``nn.MultiheadAttention``) is swapped for its :mod:`cosconvert.nn` twin,
   which holds the working copy's weights, if :mod:`cosconvert.selection` selects it;
2. a normalizer is stripped as ``strip_norms`` asks (:mod:`cosconvert.strip`);
3. any other module, a layer subclass with a forward of its own (same-padding, weight
   standardization, LoRA) included, is traced with fx (:mod:`cosconvert.trace`) and its graph
   checked against it on the captured inputs; the walk converts the graph's layers, then
   :mod:`cosconvert.rewrite` points its functional calls (``F.linear``, ``F.conv2d``, a linear
   ``torch.addmm``, ...) at their cosine twins on the operands they really receive.

A module that cannot be traced (data-dependent control flow, unsupported Python), whose graph
disagrees with it, or whose forward takes optional inputs (a graph would fix which are given)
is converted by fallback: each child is converted on its own and the module's own forward
runs under :class:`~cosconvert.calls.CosineCalls`. Finally the converted model runs once on
the example inputs under :class:`~cosconvert.calls.DotProductCalls`, and the report lists the
layers as they really ran.
"""

from __future__ import annotations

import copy
import inspect as pyinspect
import traceback
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import nn

from cosconvert.calibration import calibrate
from cosconvert.calls import plain_class, scoped_class
from cosconvert.capture import Capture, example_batch, optional_inputs, quiet
from cosconvert.config import CosineConfig
from cosconvert.errors import first_line
from cosconvert.layers import LAYERS, LEAVES, UNCONVERTIBLE, is_done, is_leaf, is_norm, out_units, own_forward
from cosconvert.nn import CosineMultiheadAttention
from cosconvert.report import ConversionReport
from cosconvert.rewrite import GraphRewriter
from cosconvert.selection import EXCLUDED, Selection
from cosconvert.strip import Affine, NormStripper
from cosconvert.trace import graft, join, trace
from cosconvert.verify import compare_with_cosine_calls, cosine_calls_output, verify

__all__ = ["convert", "inspect", "report_of", "Affine", "CosineConfig"]


def convert(
    model: nn.Module,
    config: CosineConfig | None = None,
    *,
    example_inputs: tuple | dict | torch.Tensor | None = None,
    calibration_data: Iterable | None = None,
    inplace: bool = False,
    **settings,
) -> nn.Module:
    """The cosine-normalized twin of ``model``; ``model`` itself is left unchanged, unless ``inplace``.

    Args:
        config: how to convert (:class:`~cosconvert.config.CosineConfig`: ``centered``, ``gain``,
            ``eps``, ``strip_norms``, ``include``, ``exclude``); ``settings`` given as keywords
            (``convert(model, strip_norms="fold")``) change those fields of it.
        example_inputs: inputs to check the conversion on (a tuple of positional inputs, a
            tensor, or a dict of keyword inputs); else the first calibration batch, else inputs
            inferred from the first layer. Every traced graph is compared with its module on
            them (a graph that disagrees is not used: fallback), the converted model's layer
            calls are checked at run time where something runs by fallback, and, for
            ``example_inputs``, the output shapes of both models are compared.
        calibration_data: if given, an iterable of input batches on which each cosine layer's
            gain and bias are fitted to the original layer's outputs (:func:`calibrate`).
        inplace: convert ``model`` itself, with no second copy of its weights (for a model that
            fits in memory once); ``model`` is used up: keep only the returned module. The checks
            that need the original beside the converted model (the cosine check, output shapes,
            calibration) cannot run.

    Returns the converted module, with its :class:`ConversionReport` as ``.cosine_report``
    (also given by :func:`cosconvert.report_of`).
    """
    config = (config or CosineConfig()).replace(**settings)
    if inplace and calibration_data is not None:
        raise ValueError("calibration needs the original beside the converted model: convert with "
                         "inplace=False, or calibrate a converted copy against the original")  # fmt: skip
    report = ConversionReport(settings=config.to_dict())
    if calibration_data is not None and iter(calibration_data) is calibration_data:
        calibration_data = list(calibration_data)  # a one-pass iterator: its first batch is read twice
    original_parameters = _count(model)
    work = model if inplace else copy.deepcopy(model)
    watched = [m for m in work.modules() if not is_leaf(m) or own_forward(m)]
    batch = example_batch(example_inputs, calibration_data)
    capture = Capture(work, batch, watched)
    walk = _Walk(report, capture, config)
    converted = walk.run(work, "", root=True)
    report.parameters = {"original": original_parameters, "converted": _count(converted)}
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
    wanted = not config.strip_norms and (report.fallbacks or example_inputs is not None)
    if inplace and capture.example is not None and wanted:
        report.checks["cosine check"] = "not run: converted in place, so no original was kept to compare with"
    elif capture.example is not None and wanted:
        compare_with_cosine_calls(model, converted, report, *capture.example, config)
    _attach(converted, report)
    if example_inputs is not None and not inplace:
        _check_outputs(model, converted, batch[0], batch[1], config)
    if calibration_data is not None:
        calibrate(converted, model, calibration_data)
    return converted


def report_of(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`convert`."""
    report = getattr(model, "cosine_report", None)
    if report is None:
        raise ValueError("this model was not made by cosconvert.convert (it has no cosine_report)")
    return report


def inspect(model: nn.Module, config: CosineConfig | None = None, **kwargs) -> ConversionReport:
    """What :func:`convert` would do to ``model`` with these arguments, changing nothing."""
    kwargs.pop("calibration_data", None)
    return report_of(convert(model, config, **kwargs))


class _Walk:
    """One conversion's walk down the module tree: what it swaps, traces, or runs by fallback.
    It writes each decision to ``report``; selection, stripping and the graph rewrite are
    delegated to the objects it holds, which write to the same report."""

    def __init__(self, report: ConversionReport, capture: Capture, config: CosineConfig) -> None:
        self.report, self.capture, self.config = report, capture, config
        self.stripper = NormStripper(config, report)
        self.selected = Selection(config)
        self.rewriter = GraphRewriter(report, self.selected, self.stripper, config)
        self._in_fallback = 0  # > 0 while converting the children of a module run under CosineCalls

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
            self._skip(path, type(module).__name__, EXCLUDED)
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
            return self.fallback(module, path, first_line(err, with_type=True), _user_location(err))
        mismatch = self.capture.check(gm, module)
        if mismatch is not None:
            return self.fallback(module, path, mismatch, _forward_location(module))
        self.convert_leaves(gm, path)
        self.rewriter.rewrite(gm, path, out_units(module), in_fallback=self._in_fallback > 0)
        return gm if root else graft(module, gm)

    def convert_leaves(self, gm: fx.GraphModule, path: str) -> None:
        """Convert the modules ``gm``'s graph calls as leaves: its layers (its normalizers are the rewrite's)."""
        for name, m in list(gm.named_modules()):
            if name and is_leaf(m) and not is_norm(m) and not _inside_leaf(gm, name):
                new = self.run(m, join(path, name))
                if new is not m:
                    gm.set_submodule(name, new)

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
            self._skip(name, type(m).__name__, EXCLUDED)
            return m
        try:
            twin = twin_cls.from_module(m, share=True, **self.config.layer)  # the walk's own copy
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
        self._in_fallback += 1
        try:
            self.convert_children(module, path)
        finally:
            self._in_fallback -= 1
        # Calls on the weights of layers left as dot products (unconvertible, excluded, or skipped for a
        # reason of their own) stay plain under the fallback's CosineCalls, as the report says.
        skipped = {row["name"] for row in self.report.skipped}
        module.cosine_plain = tuple(
            join(owner, pname)
            for owner, m in module.named_modules()
            for pname, _ in m.named_parameters(recurse=False)
            if join(path, owner) in skipped or isinstance(m, tuple(UNCONVERTIBLE))
            or not self.selected(join(path, owner), m)
        )
        if own_forward(module):  # a layer: its calls are its own, with its gain
            units = out_units(module) if self.config.gain == "channel" else 1
            if self.config.gain != "none" and units:
                like = module.weight
                module.register_parameter(
                    "cosine_gain", nn.Parameter(torch.ones(units, device=like.device, dtype=like.dtype))
                )
            self.report.converted.append({
                "name": path, "kind": "run-time", "source": type(module).__name__,
                "target": "CosineCalls (its forward, with its own padding and weight transform)",
            })  # fmt: skip
        module.__class__ = scoped_class(type(module))
        module.cosine_config = self.config
        return module

    def _skip(self, name: str, kind: str, reason: str) -> None:
        self.report.skipped.append({"name": name, "type": kind, "reason": reason})


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


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _attach(converted: nn.Module, report: ConversionReport) -> None:
    converted.cosine_report = report
    if isinstance(converted, fx.GraphModule):  # survive GraphModule's deepcopy, which rebuilds from the graph
        preserved = converted.meta.setdefault(fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY, {})
        preserved["cosine_report"] = report


def _check_outputs(model: nn.Module, converted: nn.Module, args: tuple, kwargs: dict, config: CosineConfig) -> None:
    """The converted model's outputs have the original's shapes, or, where the network computes a
    length (a duration predictor), those of the original run with cosine calls."""
    shapes = lambda out: [t.shape for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]  # noqa: E731
    with quiet(model):
        ref = shapes(model(*args, **kwargs))
    with quiet(converted):
        out = shapes(converted(*args, **kwargs))
    if ref != out and shapes(cosine_calls_output(model, args, kwargs, config)) != out:
        raise RuntimeError(f"converted model's outputs {out} differ in shape from the original's {ref}")
