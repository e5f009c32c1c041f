"""The fx pass: what it converts, strips, skips and falls back on, checked at run time."""

import pytest
import torch
import torch.nn.functional as F
from helpers import norm_layers, plain_layers, run_and_spy
from reference import cosine_reference, linear_reference
from torch import nn

import cosconvert
from cosconvert.calibration import agreement
from cosconvert.nn import CosineConv2d, CosineLinear


class Functional(nn.Module):
    """Only functional calls: conv, norms and linear on raw parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        x = F.relu(F.group_norm(torch.conv2d(x, self.w1, None, 1, 1), 2, self.gn_w, self.gn_b))
        x = F.layer_norm(x.mean((2, 3)), (8,))
        return F.linear(x, self.w2)


def test_functional_model_is_fully_converted_and_matches_reference():
    model = Functional()
    x = torch.randn(2, 3, 6, 6)
    conv = cosconvert.convert(model, gain="none")
    out, dots, norms = run_and_spy(conv, x)
    assert dots == [] and norms == ["group_norm", "layer_norm"]
    assert {r["kind"] for r in conv.cosine_report.converted} == {"functional"}
    # the same math, step by step, from the float64 reference
    h = cosine_reference(x, model.w1, padding=1)
    h = F.relu(F.group_norm(h, 2, model.gn_w.double(), model.gn_b.double()))
    ref = linear_reference(F.layer_norm(h.mean((2, 3)), (8,)), model.w2)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)

    stripped = cosconvert.convert(model, strip_norms="drop")
    _, dots, norms = run_and_spy(stripped, x)
    assert dots == [] and norms == []
    assert len(stripped.cosine_report.stripped) == 2
    assert model.w1.grad is None and isinstance(model.w1, nn.Parameter)  # the original is untouched


def test_transformer_encoder():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 16)
    for strip in [False, "fold"]:
        conv = cosconvert.convert(model, strip_norms=strip)
        assert plain_layers(conv) == []
        out, dots, norms = run_and_spy(conv, x)
        assert dots == [] and out.shape == x.shape and torch.isfinite(out).all()
        assert (norms == []) == bool(strip) and (norm_layers(conv) == []) == bool(strip)
    kinds = [r["kind"] for r in conv.cosine_report.converted]
    assert kinds.count("attention") == 2 and kinds.count("module") == 4


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
        self.extra = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = -x
        return F.linear(self.head(x), self.extra)


def test_untraceable_model_falls_back_and_says_where():
    model = Branchy().eval()
    conv = cosconvert.convert(model, strip_norms="drop")
    report = conv.cosine_report
    [fallback] = report.fallbacks
    assert (
        fallback["name"] == "<root>"
        and "test_convert.py" in fallback["location"]
        and "x.sum() > 0" in fallback["location"]
    )
    assert "run time" in fallback["limits"]
    assert plain_layers(conv) == [] and norm_layers(conv) == []
    out, dots, _ = run_and_spy(conv, torch.randn(2, 3, 6, 6))
    assert dots == [] and out.shape == (2, 5)


class Untraceable(nn.Module):
    """Data-dependent control flow around a conv and a functional linear."""

    def __init__(self, inner=None):
        super().__init__()
        self.inner = inner if inner is not None else nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 4 * 5 * 5))

    def forward(self, x):
        y = self.inner(x)
        if y.sum() > -1e9:  # always true, but fx cannot know
            y = y * 1.0
        return y if y.dim() == 2 else F.linear(y.flatten(1), self.w)


def test_nested_fallbacks_normalize_once():
    """Fallback scopes nest (outer and inner modules both untraceable): each dot product is
    normalized exactly once, checked against the float64 reference."""
    inner = Untraceable()
    model = nn.Sequential(Untraceable(inner))  # the outer's inner is itself untraceable
    x = torch.randn(2, 3, 5, 5)
    conv = cosconvert.convert(model, gain="none")
    assert len(conv.cosine_report.fallbacks) == 3
    out, dots, _ = run_and_spy(conv, x)
    assert dots == []
    h = cosine_reference(x, inner.inner.weight, inner.inner.bias, padding=1)
    h = linear_reference(h.flatten(1), inner.w)
    torch.testing.assert_close(out.double(), h.detach(), atol=1e-5, rtol=0)


def test_include_and_exclude():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    keep_head = cosconvert.convert(model, exclude=["3"])
    layer = lambda m, name: m.get_submodule(name)  # noqa: E731 - the result is a GraphModule, not a Sequential
    assert isinstance(layer(keep_head, "0"), CosineConv2d) and type(layer(keep_head, "3")) is nn.Linear
    assert keep_head.cosine_report.skipped[0]["reason"] == "excluded by include/exclude"
    only_linear = cosconvert.convert(model, include=[nn.Linear])
    assert type(layer(only_linear, "0")) is nn.Conv2d and isinstance(layer(only_linear, "3"), CosineLinear)
    assert cosconvert.inspect(model, exclude=["3"]).to_dict() == keep_head.cosine_report.to_dict()
    assert type(model[0]) is nn.Conv2d  # inspect and convert change nothing


def test_unconvertible_layers_are_reported_not_skipped_silently():
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.Flatten(1, 2), nn.GRU(6, 4, batch_first=True))
    report = cosconvert.inspect(model)
    assert {r["type"] for r in report.skipped} == {"ConvTranspose2d", "GRU"}
    assert all(r["reason"] for r in report.skipped)


@pytest.fixture(scope="module")
def digits_cnn():
    from cosconvert.demo import train_digits_cnn

    return train_digits_cnn(epochs=6)


@pytest.fixture(scope="module")
def digits_batches():
    from cosconvert.data import digits

    return list(torch.utils.data.DataLoader(digits("train"), batch_size=256))


def test_fold_keeps_a_bn_network_closer_than_drop(digits_cnn, digits_batches):
    fold = agreement(digits_cnn, cosconvert.convert(digits_cnn, strip_norms="fold"), digits_batches)
    drop = agreement(digits_cnn, cosconvert.convert(digits_cnn, strip_norms="drop"), digits_batches)
    print("fold", fold, "drop", drop)
    assert fold["output_cosine"] > drop["output_cosine"]


@pytest.mark.parametrize("strip", [False, "fold"])
def test_calibration_improves_agreement_on_digits(digits_cnn, digits_batches, strip):
    conv = cosconvert.convert(digits_cnn, strip_norms=strip, calibration_data=digits_batches)
    cal = conv.cosine_report.calibration
    print(strip, cal)
    assert cal["after"]["top1_agreement"] >= 90.0
    assert cal["after"]["top1_agreement"] > cal["before"]["top1_agreement"] + 50


def test_save_restore_round_trip(tmp_path, digits_cnn, digits_batches):
    conv = cosconvert.convert(digits_cnn, strip_norms="fold", exclude=[nn.Linear], calibration_data=digits_batches[:2])
    path = tmp_path / "converted.pt"
    cosconvert.save(conv, path)
    payload = torch.load(path, weights_only=True)  # plain data only
    assert payload["recipe"]["exclude"] == ["torch.nn.modules.linear:Linear"]
    from cosconvert.demo import DigitsCNN

    restored = cosconvert.restore(DigitsCNN(), path)
    x = digits_batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), conv.eval()(x), atol=0, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strip_norms"):
        cosconvert.convert(nn.Linear(2, 2), strip_norms="yes")
    with pytest.raises(ValueError, match="gain"):
        cosconvert.convert(nn.Linear(2, 2), gain="big")
