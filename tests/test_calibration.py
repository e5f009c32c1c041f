"""Calibration on real pretrained networks, wherever their layers live: a root run by fallback
(torchcrepe's pitch tracker, whose ``forward(x, embed=False)`` branches on its argument), and
functional calls in a rewritten graph. Judged by the original's own task metric and by an
independent least-squares fit, and by :mod:`cosconvert.agreement` against scikit-learn's metrics."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import cosine_reference
from torch import nn

import cosconvert
from cosconvert.agreement import agreement, output_kind
from cosconvert.strip import Affine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from pretrained import crepe, raw_pitch_accuracy, tones  # noqa: E402


@pytest.fixture(scope="module")
def pitch_net():
    return crepe("tiny")


def test_calibration_under_a_fallback_root_fits_every_layer_and_keeps_the_task(pitch_net):
    """The fallback's CosineCalls used to turn calibration's plain target into a cosine too, so the
    fit was a no-op (gains 1, agreement unchanged). Now the calibrated tracker keeps its pitch accuracy."""
    frames, _ = tones(256, seed=0)
    test, f0 = tones(256, seed=1)
    converted = cosconvert.convert(pitch_net, strip_norms="fold", example_inputs=(frames[:2],))
    assert [f["name"] for f in cosconvert.report_of(converted).fallbacks] == ["<root>"]
    result = cosconvert.calibrate(converted, pitch_net, [frames[i : i + 64] for i in range(0, 256, 64)])
    gains = {n: p for n, p in converted.named_parameters() if n.endswith("gain")}
    assert len(gains) == 7 and all(not torch.allclose(g, torch.ones_like(g)) for g in gains.values())
    assert result["status"] == "improved" and result["fitted"] == 7
    assert result["after"]["kind"] == "multilabel"
    assert result["after"]["top1_agreement"] > result["before"]["top1_agreement"] + 50
    with torch.no_grad():
        original, calibrated = raw_pitch_accuracy(pitch_net(test), f0), raw_pitch_accuracy(converted(test), f0)
    print(f"raw pitch accuracy: original {original:.1f}, calibrated {calibrated:.1f}")
    assert original > 90 and calibrated > original - 3


class SamePadConv(nn.Conv2d):
    """A conv that pads in its own forward (as EfficientNet-Lite's Conv2dStaticSamePadding): traced,
    so its converted call is a functional one in the graph, with a gain parameter of the graph's."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_calibration_fits_a_functional_call_by_least_squares_through_zero():
    """A bias-free functional call gets the gain of the line through zero per unit, against numpy
    on the float64 unfold cosine."""
    torch.manual_seed(0)
    original = nn.Sequential(SamePadConv(3, 6, 3, bias=False)).eval()
    x = torch.randn(8, 3, 12, 12) + 0.3
    converted = cosconvert.convert(original, example_inputs=(x,))
    assert [r["kind"] for r in cosconvert.report_of(converted).converted] == ["functional"]
    with torch.no_grad():
        w = original[0].weight.double()
        padded = F.pad(x.double(), (1, 1, 1, 1))
        cos = cosine_reference(padded, w).movedim(1, -1).reshape(-1, 6).numpy()
        y = F.conv2d(padded, w).movedim(1, -1).reshape(-1, 6).numpy()
    expected = (cos * y).sum(0) / (cos * cos).sum(0)
    result = cosconvert.calibrate(converted, original, [x])
    (gain,) = [p for n, p in converted.named_parameters() if "gain" in n]
    np.testing.assert_allclose(gain.detach().double().numpy(), expected, rtol=1e-4)
    assert result["per_layer"][0]["layer"] == "0" and result["per_layer"][0]["status"] == "fitted"


class WeightProducts(nn.Module):
    """A linear map written as ``einsum`` with a weight, then grouped experts (``_grouped_mm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 5))  # (out, in), as einsum "bd,hd->bh"
        self.experts = nn.Parameter(torch.randn(2, 8, 4))  # (experts, in, out)
        self.register_buffer("offs", torch.tensor([5, 12], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bd,hd->bh", x, self.w).relu().contiguous()
        return torch._grouped_mm(h, self.experts, offs=self.offs)  # rows 0-4 to expert 0, 5-11 to expert 1


def test_calibration_fits_each_unit_of_a_weight_product_by_least_squares_through_zero():
    """Products with a weight (an einsum, grouped experts) get per-unit gains too: for each unit, the
    line through zero from its cosines to the original's products, against an independent float64
    fit (the experts' inputs are the calibrated einsum's outputs, as the pass feeds them)."""
    torch.manual_seed(0)
    original, x = WeightProducts().eval(), torch.randn(12, 5) + 0.2
    converted = cosconvert.convert(original, gain="channel", example_inputs=(x,))
    result = cosconvert.calibrate(converted, original, [x])
    gains = {tuple(p.shape): p.detach().double() for n, p in converted.named_parameters() if "gain" in n}

    def fit(cos: torch.Tensor, target: torch.Tensor, dim: int) -> torch.Tensor:
        return (cos * target).sum(dim) / (cos * cos).sum(dim)

    xd, w, experts = x.double(), original.w.double(), original.experts.double()
    cos = F.normalize(xd, dim=1) @ F.normalize(w, dim=1).T  # (12, 8)
    expected = fit(cos, xd @ w.T, 0)
    torch.testing.assert_close(gains[(8, 1)].flatten(), expected, rtol=1e-5, atol=0)
    h = (expected * cos).relu()  # what the calibrated einsum feeds the experts
    for e, rows in enumerate([slice(0, 5), slice(5, 12)]):
        cos_e = F.normalize(h[rows], dim=1) @ F.normalize(experts[e], dim=0)
        torch.testing.assert_close(gains[(2, 1, 4)][e, 0], fit(cos_e, h[rows] @ experts[e], 0), rtol=1e-5, atol=0)
    assert [row["status"] for row in result["per_layer"]] == ["fitted", "fitted"], result["per_layer"]
    assert result["after"]["output_cosine"] > result["before"]["output_cosine"], result


def test_a_batchnorm_kept_as_affine_keeps_its_running_statistics():
    """BatchNorm after an activation cannot fold into a layer; in eval mode it is an affine map, and
    the Affine left in its place computes it exactly."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 4), bn.weight.data.uniform_(0.5, 2)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bn).eval()
    converted = cosconvert.convert(original, strip_norms="fold")
    (affine,) = [m for m in converted.modules() if isinstance(m, Affine)]
    z = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(affine(z), bn(z))
    assert "running statistics included" in cosconvert.report_of(converted).stripped[0]["action"]


def test_agreement_fits_the_output_kind():
    """Top-1 for logits and softmax, the Jaccard index of the units above 0.5 for sigmoid outputs
    (against scikit-learn's), the output cosine for embeddings."""
    from sklearn.metrics import jaccard_score

    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    assert output_kind(logits) == "classifier" and output_kind(logits.softmax(1)) == "classifier"
    assert output_kind(torch.randn(50, 3, 4)) == "embedding"
    ref, out = torch.rand(50, 12), torch.rand(50, 12)
    ref[:5], out[:5] = 0.1, 0.2  # no unit above 0.5 in either: they agree
    assert output_kind(ref) == "multilabel"
    result = agreement(lambda x: ref, lambda x: out, [(None,)])
    expected = jaccard_score((ref > 0.5).numpy(), (out > 0.5).numpy(), average="samples", zero_division=1.0)
    assert result["unit_agreement"] == pytest.approx(100 * expected, abs=0.01)
    noisy = logits + 0.3 * torch.randn_like(logits)
    top1 = agreement(lambda x: logits, lambda x: noisy, [(None,)])["top1_agreement"]
    assert top1 == pytest.approx(100.0 * (logits.argmax(1) == noisy.argmax(1)).double().mean().item())
