"""How closely a model reproduces a reference model's outputs, by the measure that fits the output.

- ``classifier``: ``(N, classes)`` scores that are not all in [0, 1] (logits) or rows that sum to 1
  (softmax): top-1 agreement, the share of samples whose argmax is the reference's.
- ``multilabel``: ``(N, units)`` values all in [0, 1] that are not a softmax (sigmoid heads, a pitch
  tracker's bins): per-unit agreement as the Jaccard index of the units each model puts above 0.5
  (two empty sets agree), and top-1 agreement beside it.
- ``tokens``: a language model's ``(N, T, vocab)`` logits (an output with ``.logits``, as transformers'
  causal LMs return): top-1 agreement per token, the share of positions whose next-token argmax is the
  reference's.
- ``embedding``: anything else (features, regression, sequences): the output cosine and the
  relative squared error ``|out - ref|^2 / |ref|^2``.

Every kind also reports the mean output cosine per sample. ``score`` is the headline figure of the
kind, where higher is better; calibration keeps or reverts its fit by it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosconvert.distributed import all_sum

__all__ = ["Agreement", "agreement", "output_kind", "first_output", "score"]

HEADLINE = {"classifier": "top1_agreement", "multilabel": "unit_agreement", "tokens": "top1_agreement",
            "embedding": "output_cosine"}  # fmt: skip


def first_output(out) -> Tensor:
    """The tensor a model's output leads with: itself, a tuple's first item, a dict's or a
    ``ModelOutput``'s first tensor (``logits``)."""
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"the model's output holds no tensor: {type(out).__name__}")


def output_kind(ref: Tensor) -> str:
    """``"classifier"``, ``"multilabel"`` or ``"embedding"`` for a reference output ``ref``."""
    if ref.dim() != 2 or ref.shape[1] < 2 or not ref.is_floating_point():
        return "embedding"
    if ref.min() >= 0 and ref.max() <= 1:
        softmax = torch.allclose(ref.double().sum(1), torch.ones(len(ref), dtype=torch.float64), atol=1e-3)
        return "classifier" if softmax else "multilabel"
    return "classifier"


class Agreement:
    """Running agreement over batches: ``add(ref, out)`` per batch, then ``result()``. The kind is
    read off the first reference batch."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.count = 0
        self.sums = {"cosine": 0.0, "top1": 0.0, "units": 0.0, "err": 0.0, "power": 0.0, "positions": 0.0}

    def add(self, ref, out) -> None:
        logits = getattr(ref, "logits", None)
        ref, out = first_output(ref), first_output(out).detach()
        if self.kind is None:  # a language model's output leads with its (N, T, vocab) logits
            tokens = isinstance(logits, Tensor) and logits.dim() == 3 and logits is ref
            self.kind = "tokens" if tokens else output_kind(ref)
        ref = ref.detach()
        rows = len(ref) if ref.dim() else 1
        r, o = ref.reshape(rows, -1).double(), out.reshape(rows, -1).double()
        s = self.sums
        s["cosine"] += F.cosine_similarity(r, o, dim=1).sum().item()
        s["err"] += (o - r).pow(2).sum().item()
        s["power"] += r.pow(2).sum().item()
        if self.kind == "tokens":
            s["top1"] += (ref.argmax(-1) == out.argmax(-1)).sum().item()
            s["positions"] += ref[..., 0].numel()
        elif self.kind != "embedding":
            s["top1"] += (r.argmax(1) == o.argmax(1)).sum().item()
        if self.kind == "multilabel":
            a, b = r > 0.5, o > 0.5
            union = (a | b).sum(1)
            s["units"] += torch.where(union > 0, (a & b).sum(1) / union.clamp_min(1), 1.0).sum().item()
        self.count += rows

    def result(self, rounded: bool = True) -> dict:
        """``kind``, ``samples``, ``output_cosine``, ``relative_error``, and by kind
        ``top1_agreement`` and ``unit_agreement`` (percent); ``rounded`` to 4 and 2 decimals for reports."""
        n, s = max(self.count, 1), self.sums
        keep = (lambda value, digits: round(value, digits)) if rounded else (lambda value, _: value)
        out = {
            "kind": self.kind,
            "samples": self.count,
            "output_cosine": keep(s["cosine"] / n, 4),
            "relative_error": keep(s["err"] / max(s["power"], 1e-300), 4),
        }
        if self.kind in ("classifier", "multilabel"):
            out["top1_agreement"] = keep(100.0 * s["top1"] / n, 2)
        if self.kind == "tokens":
            out["top1_agreement"] = keep(100.0 * s["top1"] / max(s["positions"], 1), 2)
        if self.kind == "multilabel":
            out["unit_agreement"] = keep(100.0 * s["units"] / n, 2)
        return out


def score(result: dict) -> tuple[float, float]:
    """A result's (headline figure, output cosine): higher is better, compared in that order."""
    return result[HEADLINE[result["kind"] or "embedding"]], result["output_cosine"]


@torch.no_grad()
def agreement(reference: nn.Module, model: nn.Module, batches: Iterable[tuple]) -> dict:
    """:meth:`Agreement.result` of ``model`` against ``reference`` on ``batches`` of positional inputs
    (under torchrun: on every rank's batches)."""
    running = Agreement()
    for inputs in batches:
        running.add(reference(*inputs), model(*inputs))
    totals = all_sum({**running.sums, "samples": running.count})  # under torchrun: every rank's batches
    running.count = int(totals.pop("samples"))
    running.sums = totals
    return running.result()
