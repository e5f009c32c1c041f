"""Calibration: start the converted network close to the original function.

A cosine layer's output is bounded; the layer it replaced produced ``w . x + b`` (then, often, a
normalizer). On a few batches of real inputs, each cosine layer call ``j`` gets the per-unit gain
``a_j`` and bias ``c_j`` of the least-squares fit

    original_j(x) ~ a_j * cos_j(x) + c_j

on the inputs the *converted* network feeds it, layer after layer in one pass (each call outputs
its fitted values at once, so the layers after it are fitted to calibrated inputs). Where the pass
folded a normalizer into the layer, the target includes that normalizer.

Every cosine call is fitted wherever it lives: a cosine module, a rewritten graph's functional
call, or a call that :class:`~cosconvert.calls.CosineCalls` redirects at run time, since all of them
pass through :func:`cosconvert.functional.observing`. A call without a bias parameter gets the gain
alone (a line through zero), and so does a product with a weight (``einsum``, ``x @ W.T``, grouped
experts), one gain per output unit of its weight.

Calibration never leaves a network further from the original than it found it: a layer whose fit
is worse on its own target than its old gain and bias is put back, and if the whole network then
agrees less with the original (:mod:`cosconvert.agreement`), every layer is put back. The result
says which, layer by layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from cosconvert import functional as CF
from cosconvert.agreement import HEADLINE, agreement, score
from cosconvert.data import batch_inputs
from cosconvert.distributed import all_sum

__all__ = ["calibrate", "summary", "LayerFits"]

_UNCHANGED = 1e-6  # a relative change of a gain or bias below this is no change


def _add_unit_sums(sums: dict, cos: Tensor, target: Tensor, dim: int) -> None:
    """Add to ``sums``, per unit (axis ``dim``) over all its positions, the float64 sums of ``c``,
    ``y``, ``c^2`` and ``c y``, and their count ``n``. Taken a few samples at a time, so that the
    float64 copies stay small (~8 MB) whatever the batch."""
    if dim == 0:  # an unbatched input
        cos, target, dim = cos[None], target[None], 1
    rest = [d for d in range(cos.dim()) if d != dim]
    per_chunk = max(1, 2**20 // max(1, cos[0].numel()))
    sums["n"] = sums.get("n", 0) + cos.numel() // max(1, cos.shape[dim])
    for c, y in zip(cos.split(per_chunk), target.split(per_chunk)):
        c, y = c.double(), y.double()
        for key, value in [("c", c.sum(rest)), ("y", y.sum(rest)), ("cc", (c * c).sum(rest)), ("cy", (c * y).sum(rest))]:  # fmt: skip
            sums[key] = sums.get(key, 0) + value


def _per_unit(t: Tensor | None, dim: int, ndim: int) -> Tensor | float:
    """``t`` (one value per unit, or one scalar) shaped to broadcast along axis ``dim`` of ``ndim``."""
    if t is None:
        return 0.0
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape) if t.numel() > 1 else t.reshape([1] * ndim)


class _Fit:
    """One layer's running least-squares sums, its old gain and bias, and its error on its target
    before (old gain and bias) and after (the fit), summed over the calls seen."""

    def __init__(self, name: str, gain: Tensor, bias: Tensor | None, target_bias: Tensor | None, norm) -> None:
        self.name, self.gain, self.bias, self.target_bias, self.norm = name, gain, bias, target_bias, norm
        self.saved = (gain.detach().clone(), None if bias is None else bias.detach().clone())
        self.sums: dict[str, Tensor | float] = {}
        self.error = {"before": 0.0, "after": 0.0, "power": 0.0}

    def add(self, cos: Tensor, target: Tensor, dim: int) -> Tensor:
        """Take one call's bare cosines and target into the fit; the fitted output."""
        dim = dim % cos.dim()
        sums: dict = {}
        _add_unit_sums(sums, cos, target, dim)
        self._take(sums)
        old = cos * _per_unit(self.saved[0], dim, cos.dim()) + _per_unit(self.saved[1], dim, cos.dim())
        new = cos * _per_unit(self.gain, dim, cos.dim()) + _per_unit(self.bias, dim, cos.dim())
        return self._score(old, new, target, cos.dtype)

    def add_product(self, call: CF.ProductCall, target: Tensor) -> Tensor:
        """Take one product call into the fit (a gain, no bias); the fitted output. Its output is
        linear in the gain, each unit's output ``g_k c``, so the per-unit sums ``sum c y`` and
        ``sum c^2`` are the gradients, at a gain of ones, of ``sum out * y`` and ``sum out^2 / 2``,
        whatever the layout of units in the product."""
        ones = torch.ones_like(self.gain, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            out = call.cosine(ones).double()
            (cy,) = torch.autograd.grad((out * target.double()).sum(), ones, retain_graph=True)
            (cc,) = torch.autograd.grad(out.square().sum() / 2, ones)
        self._take({"cy": cy, "cc": cc, "n": out.numel()})
        fitted = call.cosine(self.gain)
        return self._score(call.cosine(self.saved[0]), fitted, target, fitted.dtype)

    def _take(self, sums: dict) -> None:
        for key, value in all_sum(sums).items():  # under torchrun: every rank's call, so every rank fits alike
            self.sums[key] = self.sums.get(key, 0) + value
        self.apply()

    def _score(self, old: Tensor, new: Tensor, target: Tensor, dtype: torch.dtype) -> Tensor:
        """Add the call's error with the old and the fitted gain to the running totals; the fitted output."""
        t = target.double()
        error = {"before": (old.double() - t).pow(2).sum(), "after": (new.double() - t).pow(2).sum(), "power": t.pow(2).sum()}
        for key, value in all_sum(error).items():
            self.error[key] += float(value)
        return new.to(dtype)

    @torch.no_grad()
    def apply(self) -> None:
        s, n = self.sums, self.sums["n"]
        if self.bias is not None:
            var = s["cc"] - s["c"] ** 2 / n
            a = torch.where(var > 1e-12, (s["cy"] - s["c"] * s["y"] / n) / var.clamp_min(1e-12), 1.0)
            c = (s["y"] - a * s["c"]) / n
            self.bias.copy_(c.reshape(self.bias.shape).to(self.bias.dtype))
        else:
            a = s["cy"] / s["cc"].clamp_min(1e-12)
        fitted = a if self.gain.numel() > 1 else (s["cy"].sum() / s["cc"].sum().clamp_min(1e-12)).view(1)
        self.gain.copy_(fitted.reshape(self.gain.shape).to(self.gain.dtype))

    @torch.no_grad()
    def revert(self) -> None:
        self.gain.copy_(self.saved[0])
        if self.bias is not None:
            self.bias.copy_(self.saved[1])

    def changed(self) -> bool:
        def moved(now: Tensor | None, then: Tensor | None) -> bool:
            return now is not None and bool(((now - then).abs() > _UNCHANGED * (1 + then.abs())).any())

        return moved(self.gain, self.saved[0]) or moved(self.bias, self.saved[1])

    def row(self, status: str) -> dict:
        power = max(self.error["power"], 1e-300)
        return {
            "layer": self.name,
            "error_before": float(f"{self.error['before'] / power:.4g}"),
            "error_after": float(f"{self.error['after'] / power:.4g}"),
            "status": status,
        }


class LayerFits:
    """The observer (:func:`cosconvert.functional.observing`) that fits every cosine layer call of
    ``model``: per call, the target is the plain layer ``w . x + b`` (``b`` the bias as first seen,
    or as the conversion stashed it) on the call's own input, then any normalizer folded into it.

    ``only``: the ids of the weights whose calls to fit (others run as they are); ``targets``: per
    weight id, the (bias, normalizer) of the target, over what the conversion stashed."""

    def __init__(self, model: nn.Module, only: set[int] | None = None, targets: dict | None = None) -> None:
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.targets = {
            id(m.weight): m.__dict__["_stripped_norm"] for m in model.modules() if "_stripped_norm" in m.__dict__
        }
        self.targets.update(targets or {})
        self.only = only
        self.fits: dict[tuple, _Fit] = {}

    def __call__(self, call: CF.LayerCall | CF.ProductCall) -> Tensor:
        product = isinstance(call, CF.ProductCall)
        if call.gain is None or (self.only is not None and id(call.weight) not in self.only):
            return call.cosine(call.gain) if product else call.cosine(call.gain, call.bias)
        base = call.gain if call.gain._base is None else call.gain._base
        key = (id(base), call.gain.storage_offset(), call.gain.numel())
        fit = self.fits.get(key)
        if product:
            if fit is None:
                fit = self.fits[key] = _Fit(self._name(call, base), call.gain, None, None, None)
            return fit.add_product(call, call.dot_product())
        if fit is None:
            bias, norm = self.targets.get(id(call.weight), (call.bias, None))
            bias = None if bias is None else bias.detach().clone()
            fit = self.fits[key] = _Fit(self._name(call, base), call.gain, call.bias, bias, norm)
        target = call.dot_product(fit.target_bias)
        if fit.norm is not None:
            target = fit.norm(target)
        return fit.add(call.cosine(), target, call.unit_dim)

    def _name(self, call: CF.LayerCall | CF.ProductCall, gain: Tensor) -> str:
        """The layer's name: its weight's owner (``layer1.0.conv1``), else its gain's."""
        weight = call.weight if call.weight._base is None else call.weight._base
        name = self.names.get(id(weight)) or self.names.get(id(gain)) or "?"
        return name.rpartition(".")[0] or name

    def settle(self) -> list[dict]:
        """Put back each layer whose fit is worse on its own target than its old gain and bias;
        per layer: its name, its relative squared error before and after, and its status."""
        rows = []
        for fit in self.fits.values():
            if fit.error["after"] > fit.error["before"]:
                fit.revert()
                rows.append(fit.row("reverted: worse on its target"))
            else:
                rows.append(fit.row("fitted" if fit.changed() else "unchanged"))
        return rows

    def revert(self) -> None:
        for fit in self.fits.values():
            fit.revert()


@torch.no_grad()
def calibrate(converted: nn.Module, original: nn.Module, data: Iterable, max_batches: int | None = None) -> dict:
    """Fit every cosine layer's gain and bias to the original layers' outputs on ``data``
    (batches of inputs, or (inputs, labels)).

    Returns (and stores in the conversion report, when there is one): the batches and samples used,
    agreement with ``original`` before and after (:func:`cosconvert.agreement.agreement`), per layer
    its error on its own target before and after and whether its fit was kept, and ``status``:
    ``"improved"``, ``"unchanged"`` (no gain or bias moved, or agreement stayed the same), or
    ``"reverted"`` (the fit made agreement worse, so every layer was put back)."""
    batches = [batch_inputs(b) for b in itertools.islice(data, max_batches)]  # no more than that from a stream
    if not batches:
        raise ValueError("calibrate got no data: give batches of inputs, or (inputs, labels)")
    modes = converted.training, original.training
    converted.eval(), original.eval()
    try:
        before = agreement(original, converted, batches)
        fits = LayerFits(converted)
        with CF.observing(fits):
            for inputs in batches:
                converted(*inputs)
        layers = fits.settle()
        after = agreement(original, converted, batches)
        if score(after) < score(before):
            fits.revert()
            status, after = "reverted", agreement(original, converted, batches)
            for row in layers:
                row["status"] = "reverted: the network agreed less"
        elif not any(row["status"] == "fitted" for row in layers) or score(after) == score(before):
            status = "unchanged"
        else:
            status = "improved"
    finally:
        converted.train(modes[0]), original.train(modes[1])
    result = {
        "batches": len(batches),
        "samples": sum(len(inputs[0]) for inputs in batches),
        "layers": len(layers),
        "fitted": sum(row["status"] == "fitted" for row in layers),
        "status": status,
        "before": before,
        "after": after,
        "per_layer": layers,
    }
    report = getattr(converted, "cosine_report", None)
    if report is not None:
        report.calibration = result
    return result


def summary(result: dict) -> str:
    """One line on what a :func:`calibrate` result did, in plain words."""
    key = HEADLINE[result["after"]["kind"] or "embedding"]
    unit = "" if key == "output_cosine" else "%"
    words = key.replace("_", " ")
    change = f"{words} {result['before'][key]}{unit} -> {result['after'][key]}{unit}"
    where = f"on {result['samples']} samples"
    if result["status"] == "reverted":
        return f"calibration {where} made agreement worse, so every layer was put back ({change} before reverting)"
    if result["status"] == "unchanged":
        return f"calibration {where} changed nothing: {change}, {result['fitted']} of {result['layers']} layers fitted"
    reverted = sum(row["status"].startswith("reverted") for row in result["per_layer"])
    kept_back = f", {reverted} put back (worse on their own targets)" if reverted else ""
    return f"calibration {where}: {change}; {result['fitted']} of {result['layers']} layers fitted{kept_back}"
