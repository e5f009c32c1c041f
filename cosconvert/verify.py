"""The run-time check that makes a conversion report say how the converted model's layers really ran.

A layer converted by module swap or graph rewrite is a cosine by construction; what runs by
fallback (a forward under :class:`~cosconvert.calls.CosineCalls`) is only known by running it.
:func:`verify` runs the converted model once under :class:`~cosconvert.calls.DotProductCalls`
and corrects the report: a layer call that ran as a plain dot product is listed as skipped,
never as converted, and a call that CosineCalls ran as a cosine is listed as converted.
"""

from __future__ import annotations

import torch
from torch import nn

from cosconvert.calls import DotProductCalls
from cosconvert.capture import quiet
from cosconvert.report import ConversionReport

__all__ = ["verify"]


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
        first = (str(err).strip().splitlines() or [""])[0]
        report.checks["run-time check"] = (
            f"the converted model failed on the example inputs: {type(err).__name__}: {first}"
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
