"""Calibration: start the converted network close to the original function.

A cosine layer's output is bounded; the layer it replaced produced ``w . x + b`` (then,
often, a normalizer). On a few batches of real inputs, each cosine layer ``j`` gets the
per-unit gain ``a_j`` and bias ``c_j`` of the least-squares fit

    original_j(x) ~ a_j * cos_j(x) + c_j

on the inputs the *converted* network feeds it, layer after layer in one pass (each layer
outputs its fitted values at once, so the layers after it are fitted to calibrated inputs).
Where the pass stripped a normalizer after the layer, the target includes that normalizer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosconvert.nn import CosineConv1d, CosineConv2d, CosineConv3d, CosineLinear

__all__ = ["calibrate", "agreement", "batch_inputs"]

_PLAIN = {CosineLinear: nn.Linear, CosineConv1d: nn.Conv1d, CosineConv2d: nn.Conv2d, CosineConv3d: nn.Conv3d}


def batch_inputs(batch) -> tuple:
    """The model inputs of a batch: a tensor, the first item of an (inputs, labels) pair, or a dict's "input"."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, dict):
        return (batch["input"] if "input" in batch else next(iter(batch.values())),)
    return (batch[0],)


def _add_unit_sums(sums: dict, cos: Tensor, target: Tensor, dim: int) -> None:
    """Add to ``sums``, per unit (axis ``dim``) over all its positions, the float64 sums of ``c``,
    ``y``, ``c^2`` and ``c y``, and their count ``n``. Taken a few samples at a time, so that the
    float64 copies stay small (~8 MB) whatever the batch."""
    if dim == 0:  # an unbatched input
        cos, target, dim = cos[None], target[None], 1
    rest = [d for d in range(cos.dim()) if d != dim]
    per_chunk = max(1, 2**20 // max(1, cos[0].numel()))
    sums["n"] = sums.get("n", 0) + cos.numel() // cos.shape[dim]
    for c, y in zip(cos.split(per_chunk), target.split(per_chunk)):
        c, y = c.double(), y.double()
        for key, value in [("c", c.sum(rest)), ("y", y.sum(rest)), ("cc", (c * c).sum(rest)), ("cy", (c * y).sum(rest))]:  # fmt: skip
            sums[key] = sums.get(key, 0) + value


class _Fit:
    """Running least-squares sums for one layer, per output unit."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.sums: dict[str, Tensor | float] = {}

    def __call__(self, layer: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        x = inputs[0]
        # The dot-product layer it replaced (same weights, its own bias), then any normalizer stripped after it.
        bias, norm = layer.__dict__.get("_stripped_norm", (layer.bias, None))
        if isinstance(layer, CosineLinear):
            target = F.linear(x, layer.weight, bias)
        else:
            target = _PLAIN[type(layer)]._conv_forward(layer, x, layer.weight, bias)
        if norm is not None:
            target = norm(target)
        gain, bias = layer.gain, layer.bias
        layer.gain, layer.bias = None, None
        cos = layer.forward(x)
        layer.gain, layer.bias = gain, bias
        dim = cos.dim() - 1 if isinstance(layer, CosineLinear) else cos.dim() - layer.weight.dim() + 1  # units
        _add_unit_sums(self.sums, cos, target, dim)
        self.apply()
        shape = [1] * cos.dim()
        shape[dim] = -1
        out = cos * (1 if layer.gain is None else layer.gain.view(shape))
        return out if layer.bias is None else out + layer.bias.view(shape)

    def apply(self) -> None:
        s, layer = self.sums, self.layer
        n = s["n"]
        if layer.bias is not None:
            var = s["cc"] - s["c"] ** 2 / n
            a = torch.where(var > 1e-12, (s["cy"] - s["c"] * s["y"] / n) / var.clamp_min(1e-12), 1.0)
            c = (s["y"] - a * s["c"]) / n
        else:
            a = s["cy"] / s["cc"].clamp_min(1e-12)
        with torch.no_grad():
            if layer.gain is not None:
                fitted = a if layer.gain.numel() > 1 else (s["cy"].sum() / s["cc"].sum().clamp_min(1e-12)).view(1)
                layer.gain.copy_(fitted.to(layer.gain.dtype))
            if layer.bias is not None:
                layer.bias.copy_(c.to(layer.bias.dtype))


@torch.no_grad()
def agreement(reference: nn.Module, model: nn.Module, data: Iterable) -> dict:
    """How closely ``model`` reproduces ``reference`` on ``data``: mean cosine similarity of
    outputs and, for classifier outputs ``(N, classes)``, top-1 agreement in percent."""
    cos_sum, agree, count = 0.0, 0, 0
    for batch in data:
        inputs = batch_inputs(batch)
        ref, out = reference(*inputs), model(*inputs)
        cos_sum += F.cosine_similarity(ref.flatten(1).double(), out.flatten(1).double(), dim=1).sum().item()
        if ref.dim() == 2 and ref.shape[1] > 1:
            agree += (ref.argmax(1) == out.argmax(1)).sum().item()
        count += ref.shape[0]
    result = {"output_cosine": round(cos_sum / count, 4)}
    if agree or ref.dim() == 2:
        result["top1_agreement"] = round(100.0 * agree / count, 2)
    return result


@torch.no_grad()
def calibrate(converted: nn.Module, original: nn.Module, data: Iterable, max_batches: int | None = None) -> dict:
    """Fit every cosine layer's gain and bias to the original layers' outputs on ``data``
    (batches of inputs, or (inputs, labels)). Returns agreement with ``original`` before and
    after, also stored in the conversion report when there is one."""
    batches = list(itertools.islice(data, max_batches))  # no more than that taken from a stream
    modes = converted.training, original.training
    converted.eval(), original.eval()
    before = agreement(original, converted, batches)
    fits = [_Fit(m) for m in converted.modules() if type(m) in _PLAIN and m.gain is not None]
    handles = [fit.layer.register_forward_hook(fit) for fit in fits]
    try:
        for batch in batches:
            converted(*batch_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    after = agreement(original, converted, batches)
    converted.train(modes[0]), original.train(modes[1])
    result = {"batches": len(batches), "layers": len(fits), "before": before, "after": after}
    report = getattr(converted, "cosine_report", None)
    if report is not None:
        report.calibration = result
    return result
