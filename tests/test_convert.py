"""The fx pass: what it converts, strips, skips and falls back on, checked at run time."""

import pytest
import torch
import torch.nn.functional as F
from helpers import norm_layers, plain_layers, run_and_spy
from reference import cosine_reference, linear_reference
from torch import nn

import cosconvert
from cosconvert.agreement import agreement
from cosconvert.config import STRIP_MODES
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
    inputs = [(x,) for x, _ in digits_batches]
    fold = agreement(digits_cnn, cosconvert.convert(digits_cnn, strip_norms="fold"), inputs)
    drop = agreement(digits_cnn, cosconvert.convert(digits_cnn, strip_norms="drop"), inputs)
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


def _nontrivial(norm: nn.Module) -> nn.Module:
    """A normalizer with gamma, beta and running statistics far from their fresh values."""
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight) * 1.5)
        norm.bias.copy_(torch.randn_like(norm.bias))
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn_like(norm.running_mean))
            norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.5)
    return norm.eval()


FOLDS = {  # layer, normalizer, input shape
    "conv2d+BatchNorm2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.BatchNorm2d(6), (2, 3, 5, 5)),
    "conv1d+BatchNorm1d": (lambda: nn.Conv1d(3, 6, 3, stride=2), lambda: nn.BatchNorm1d(6), (2, 3, 9)),
    "linear+BatchNorm1d": (lambda: nn.Linear(5, 6), lambda: nn.BatchNorm1d(6), (4, 5)),
    "linear+LayerNorm": (lambda: nn.Linear(5, 6), lambda: nn.LayerNorm(6), (2, 3, 5)),
    "conv2d+GroupNorm": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: nn.GroupNorm(3, 6), (2, 4, 6, 6)),
}


def _affine(h: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """gamma * h + beta per channel, float64: the reference for what a folded normalizer leaves."""
    shape = [1] * h.dim()
    shape[channel_dim] = -1
    return h * norm_weight.double().view(shape) + norm_bias.double().view(shape)


@pytest.mark.parametrize("gain", ["channel", "scalar", "none"])
@pytest.mark.parametrize("case", list(FOLDS))
def test_fold_is_exactly_the_cosine_then_the_norms_affine(case, gain):
    """strip_norms="fold" drops the normalization and keeps its learned scale and shift: the folded
    layer outputs gamma * (cos + b) + beta, whatever the norm's running statistics."""
    make_layer, make_norm, shape = FOLDS[case]
    layer, norm = make_layer(), _nontrivial(make_norm())
    model = nn.Sequential(layer, norm).eval()
    x = torch.randn(shape)
    folded = cosconvert.convert(model, strip_norms="fold", gain=gain)
    assert norm_layers(folded) == [] and [r["action"] for r in folded.cosine_report.stripped] == ["folded into 0"]
    out, dots, norms = run_and_spy(folded, x)
    assert dots == [] and norms == []
    if isinstance(layer, nn.Linear):
        cos = linear_reference(x, layer.weight, layer.bias)
    else:
        cos = cosine_reference(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    channel_dim = -1 if isinstance(norm, nn.LayerNorm) else 1
    ref = _affine(cos, norm.weight, norm.bias, channel_dim).detach()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


class FunctionalNorms(nn.Module):
    """Layers followed by F.batch_norm (running statistics), F.group_norm and F.layer_norm."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1), nn.Linear(4, 5)
        self.register_buffer("mean", torch.randn(6))
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.bn_w, self.bn_b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))

    def forward(self, x):
        x = F.batch_norm(self.conv1(x), self.mean, self.var, self.bn_w, self.bn_b, training=False)
        x = F.group_norm(self.conv2(x), 2, self.gn_w, self.gn_b)
        return F.layer_norm(self.fc(x.mean((2, 3))), (5,), self.ln_w, self.ln_b)


def test_fold_functional_norms_keeps_exactly_their_affine():
    model = FunctionalNorms().eval()
    x = torch.randn(2, 3, 6, 6)
    folded = cosconvert.convert(model, strip_norms="fold", gain="none")
    out, dots, norms = run_and_spy(folded, x)
    assert dots == [] and norms == []
    assert [r["action"] for r in folded.cosine_report.stripped] == ["kept as affine (functional)"] * 3
    m = model
    h = _affine(cosine_reference(x, m.conv1.weight, m.conv1.bias, padding=1), m.bn_w, m.bn_b, 1)
    h = _affine(cosine_reference(h, m.conv2.weight, m.conv2.bias), m.gn_w, m.gn_b, 1)
    ref = _affine(linear_reference(h.mean((2, 3)), m.fc.weight, m.fc.bias), m.ln_w, m.ln_b, -1)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=1e-5)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _nontrivial(nn.BatchNorm2d(6)), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.head = nn.Sequential(nn.Linear(6, 8), _nontrivial(nn.LayerNorm(8)), nn.Linear(8, 4))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h = self.head(self.body(x)).unsqueeze(1)
        return self.attn(h, h, h, need_weights=False)[0].squeeze(1)


@pytest.mark.slow
@pytest.mark.parametrize("make", [BNNet, Functional], ids=["modules", "functional"])
def test_the_original_is_untouched_by_value(make):
    """convert (every strip mode, centered too), calibrate and freeze leave every tensor of the
    original's state_dict, buffers included, as it was; freeze leaves the converted one too."""
    model = make().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]

    def assert_untouched(reference: dict, module: nn.Module, what: str) -> None:
        now = module.state_dict()
        assert now.keys() == reference.keys(), what
        changed = [k for k in reference if not torch.equal(now[k], reference[k])]
        assert changed == [], f"{what} changed {changed}"

    for strip in STRIP_MODES:
        converted = cosconvert.convert(model, strip_norms=strip, centered=bool(strip), calibration_data=batches)
        assert_untouched(before, model, f"convert(strip_norms={strip!r}) with calibration")
    cosconvert.calibrate(converted, model, batches)
    assert_untouched(before, model, "calibrate")
    converted_before = {k: v.clone() for k, v in converted.state_dict().items()}
    with torch.no_grad():
        cosconvert.freeze(converted)(batches[0])
    assert_untouched(before, model, "freeze")
    assert_untouched(converted_before, converted, "freeze (of the converted model)")
