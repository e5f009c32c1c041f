"""The run-time checks that make a conversion report say how the converted model's layers really ran.

A layer converted by module swap or graph rewrite is a cosine by construction; what runs by
fallback (a forward under :class:`~cosconvert.calls.CosineCalls`) is only known by running it.
:func:`verify` runs the converted model once under :class:`~cosconvert.calls.DotProductCalls`
and corrects the report: a layer call that ran as a plain dot product is listed as skipped,
never as converted, and a call that CosineCalls ran as a cosine is listed as converted.

:func:`compare_with_cosine_calls` judges the whole: the original model run with every dot-product
call as its cosine (:func:`cosine_calls_output`) is what a faithful conversion computes before any
gain is fitted, whatever the way each call is written. Where the two part, the report says so.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from cosconvert.calls import CosineCalls, DotProductCalls
from cosconvert.capture import quiet
from cosconvert.config import CosineConfig
from cosconvert.errors import first_line
from cosconvert.report import ConversionReport

__all__ = ["verify", "cosine_calls_output", "compare_with_cosine_calls"]

PARTS = 1e-3  # relative difference above which a converted model parts from the original run with cosines


def verify(converted: nn.Module, report: ConversionReport, args: tuple, kwargs: dict) -> None:
    """Run ``converted`` once and make the report say how its layers really ran: a layer call that
    ran as a plain dot product is listed as skipped (never converted), and a call CosineCalls ran
    as a cosine is listed as converted."""
    owners = {}
    for path, m in converted.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), path)
    stack: list[str] = []

    def leave(*_) -> None:
        stack.pop()

    hooks = []
    for path, m in converted.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda *_, path=path: stack.append(path)))
        hooks.append(m.register_forward_hook(leave))
    spy = _Attributing(owners, stack)
    try:
        with quiet(converted), spy:
            converted(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - say so, do not fail the conversion
        report.checks["run-time check"] = (
            f"the converted model failed on the example inputs: {first_line(err, with_type=True)}"
        )
        return
    finally:
        for hook in hooks:
            hook.remove()
    report.checks["run-time check"] = (
        f"{len(spy.plain)} layer calls ran as plain dot products, {len(spy.cosine_calls)} ran under CosineCalls"
    )
    listed = lambda rows, name: any(r["name"] == name or r["name"].startswith(name + ".") for r in rows)  # noqa: E731
    for func, name in dict.fromkeys(spy.plain):
        report.converted = [r for r in report.converted if r["name"] != name]
        if not listed(report.skipped, name):
            report.skipped.append({
                "name": name, "type": func, "reason": "ran as a plain dot product on the example inputs",
            })  # fmt: skip
    plain = {name for _, name in spy.plain}
    for func, name in dict.fromkeys(spy.cosine_calls):
        if name not in plain and not listed(report.converted, name):
            report.converted.append({"name": name, "kind": "run-time", "source": func, "target": "CosineCalls"})


class _Attributing(DotProductCalls):
    """:class:`DotProductCalls` that names each call's layer: the module owning its weight, else
    the innermost module running."""

    def __init__(self, owners: dict[int, str], stack: list[str]) -> None:
        super().__init__()
        self.owners, self.stack = owners, stack

    def _record(self, calls: list, func: str, weight: torch.Tensor) -> None:
        owner = self.owners.get(id(weight))
        if owner is None and weight._base is not None:
            owner = self.owners.get(id(weight._base))
        if owner is None:
            owner = self.stack[-1] if self.stack else ""
        calls.append((func, owner or "<root>"))


def cosine_calls_output(original: nn.Module, args: tuple, kwargs: dict, config: CosineConfig, plain=()):
    """``original``'s output with every dot-product call run as its cosine (gain 1), its calls on the
    weights in ``plain`` (layers left as dot products) as they are; ``original`` is left unchanged."""
    mha = torch.backends.mha  # the fast path runs attention in one op that no mode sees into
    fastpath, mha._is_fastpath_enabled = mha._is_fastpath_enabled, False
    try:
        with quiet(original), CosineCalls(config, plain=plain):
            return original(*args, **kwargs)
    finally:
        mha._is_fastpath_enabled = fastpath


def compare_with_cosine_calls(
    original: nn.Module, converted: nn.Module, report: ConversionReport, args: tuple, kwargs: dict,
    config: CosineConfig,
) -> None:  # fmt: skip
    """Write to ``report.checks["cosine check"]`` how far ``converted`` (its gains at 1, norms kept) is
    from ``original`` run with cosine calls on the example inputs, and warn where they part."""
    names = dict(original.named_modules())
    skipped = [names[row["name"]] for row in report.skipped if row["name"] in names]
    if len(skipped) < len(report.skipped):
        report.checks["cosine check"] = "not run: a skipped functional call cannot be left plain in the original"
        return
    plain = [p for m in skipped for p in m.parameters()]
    try:
        want = cosine_calls_output(original, args, kwargs, config, plain)
        with quiet(converted):
            got = converted(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - say so, do not fail the conversion
        report.checks["cosine check"] = f"not run: {first_line(err, with_type=True)}"
        return
    want, got = _floats(want), _floats(got)
    if [t.shape for t in want] != [t.shape for t in got] or not want:
        report.checks["cosine check"] = "not run: the outputs differ in shape (a length the network computes)"
        return
    rel = max(
        float((g.double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30))
        for w, g in zip(want, got)
    )
    if rel > PARTS:
        report.checks["cosine check"] = (
            f"PARTS: the converted model differs from the original run with cosine calls by {rel:.1e} "
            "(relative to the output's largest value): some dot product is computed another way"
        )
        warnings.warn(f"cosconvert: {report.checks['cosine check']}", stacklevel=3)
    else:
        report.checks["cosine check"] = f"agrees with the original run with cosine calls ({rel:.1e} relative)"


def _floats(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
