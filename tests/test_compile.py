"""Converted networks and cosine layers under ``torch.compile(fullgraph=True)`` and ``torch.export``.

``fullgraph=True`` makes any graph break an error, so each test first proves the whole forward (and,
in training, the backward) compiles as one graph, then compares outputs and gradients with the same
model run eagerly. The eager layers are checked against an independent float64 reference elsewhere
(test_layers.py); here the reference is eager, so a compiled path that computes anything else fails.

Backends, chosen for the time budget (this file: a few minutes on 2 shared cores): resnet18 and the
single-layer check run through inductor, the others through ``aot_eager`` (dynamo's graph capture and
AOTAutograd's forward/backward graphs, the parts that reject untraceable code, without inductor's
code generation, which takes minutes for vit_b_16 here).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference import cosine_reference
from torch import nn

import cosconvert
from cosconvert import functional as CF
from cosconvert.nn import CosineConv1d, CosineConv2d, CosineConv3d, CosineLinear, CosineMultiheadAttention


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles its own code; no recompile limit carried over
    yield
    torch._dynamo.reset()


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():  # compiled and eager draw different random masks
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _close(actual, expected, rtol: float, atol: float, what: str, floor: float = 0.0) -> None:
    """Close up to ``atol`` times the size of the expected tensor (gradients differ in scale by layer),
    or of ``floor`` where that is larger (a gradient that is 0 but for rounding)."""
    scale = max(expected.abs().max().item(), floor) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def check_compiled(model: nn.Module, *inputs, backend: str = "aot_eager", rtol=1e-4, atol=1e-5) -> None:
    """``model`` compiled with fullgraph=True against eager: eval outputs, then a training step's
    outputs, gradients and buffers (BatchNorm running statistics)."""
    model = _no_dropout(model)
    eager, compiled = model.eval(), copy.deepcopy(model).eval()
    run = torch.compile(compiled, fullgraph=True, backend=backend)
    with torch.no_grad():
        for out, ref in zip(_leaves(run(*inputs)), _leaves(eager(*inputs)), strict=True):
            _close(out, ref, rtol, atol, "eval output")
    eager.train(), compiled.train()
    torch._dynamo.reset()  # training compiles a forward and a backward graph of its own
    run = torch.compile(compiled, fullgraph=True, backend=backend)
    outs, refs = _leaves(run(*inputs)), _leaves(eager(*inputs))
    weights = [torch.randn_like(ref) for ref in refs]
    for leaves in (outs, refs):
        sum((out * w).sum() for out, w in zip(leaves, weights)).backward()
    for out, ref in zip(outs, refs, strict=True):
        _close(out, ref, rtol, atol, "training output")
    grads, ref_grads = _grads(compiled), _grads(eager)
    assert grads.keys() == ref_grads.keys() and grads
    largest = max(grad.abs().max().item() for grad in ref_grads.values())
    for name, grad in ref_grads.items():  # a conv bias before BatchNorm has a gradient of 0 but for rounding
        _close(grads[name], grad, rtol, 10 * atol, f"gradient of {name}", floor=1e-2 * largest)
    for (name, buf), ref in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        if buf.is_floating_point():
            _close(buf, ref, rtol, atol, f"buffer {name}")


class AllLayers(nn.Module):
    """Every layer of cosconvert.nn side by side, each on its own input: one compile for all."""

    def __init__(self, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList([
            CosineLinear(12, 7, **kwargs),
            CosineConv1d(6, 8, 3, padding="same", **kwargs),
            CosineConv2d(6, 8, 3, stride=2, padding=1, **kwargs),
            CosineConv2d(6, 8, 1, **kwargs),
            CosineConv2d(6, 9, 3, groups=3, dilation=2, **kwargs),
            CosineConv2d(6, 6, 3, groups=6, padding=1, **kwargs),
            CosineConv3d(4, 5, 2, padding=1, padding_mode="reflect", **kwargs),
        ])  # fmt: skip
        self.attention = CosineMultiheadAttention(16, 4, batch_first=True, **kwargs)
        self.shapes = [(3, 5, 12), (2, 6, 11), (2, 6, 9, 9), (2, 6, 5, 5), (2, 6, 9, 9), (2, 6, 7, 7), (2, 4, 4, 4, 4)]

    def forward(self, inputs: list[torch.Tensor], x: torch.Tensor, mask: torch.Tensor):
        return [layer(t) for layer, t in zip(self.layers, inputs)], self.attention(x, x, x, mask)[0]


@pytest.mark.slow
@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
def test_every_layer_compiles_whole(centered):
    model = AllLayers(centered=centered, gain="channel")
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "gain", None) is not None:
                module.gain.uniform_(0.5, 2.0)
    inputs = [torch.randn(shape) + 0.5 for shape in model.shapes]
    x, mask = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    check_compiled(model, inputs, x, mask)


def _hidden(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight).relu()


torch.fx.wrap("_hidden")  # an opaque leaf to fx: run under CosineCalls


class ShapeBranch(nn.Module):
    """fx cannot branch on ``x.dim()`` (a traced value), dynamo can: converted by fallback, with its
    own F.linear call on its own weight, and a fallback transformer layer inside."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16) / 4)
        self.layer = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)

    def forward(self, x):
        if x.dim() == 3:
            x = F.linear(x, self.weight)
        return self.layer(x)


class Mixed(nn.Module):
    """Every way convert reaches a dot product: module swaps, a functional call on a stored weight,
    an opaque function, and a fallback module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.kernel = nn.Parameter(torch.randn(16, 16, 1, 1) / 4)
        self.hidden = nn.Parameter(torch.randn(16, 16) / 4)
        self.branch = ShapeBranch()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.conv2d(self.bn(self.conv(x)).relu(), self.kernel)
        x = _hidden(x.flatten(2).transpose(1, 2), self.hidden)
        return self.head(self.branch(x).mean(1))


def _converted_mixed(**kwargs) -> nn.Module:
    converted = cosconvert.convert(Mixed(), gain="channel", **kwargs)
    report = cosconvert.report_of(converted)
    assert {f["name"] for f in report.fallbacks} >= {"branch"}  # the precondition: a fallback module
    for module in converted.modules():  # non-trivial gains, so the gain slicing in the modes counts
        if getattr(module, "gain", None) is not None:
            with torch.no_grad():
                module.gain.uniform_(0.5, 2.0)
    return converted


@pytest.mark.slow
def test_every_conversion_path_compiles_whole():
    check_compiled(_converted_mixed(), torch.randn(2, 3, 6, 6))


@pytest.mark.slow
def test_frozen_model_compiles_and_exports():
    converted = _converted_mixed().eval()
    frozen, x = cosconvert.freeze(converted), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = converted(x)
        compiled = torch.compile(frozen, fullgraph=True, backend="aot_eager")(x)
        exported = torch.export.export(frozen, (x,)).module()(x)
    _close(compiled, expected, 1e-4, 1e-5, "frozen, compiled")
    _close(exported, expected, 1e-4, 1e-5, "frozen, exported")


@pytest.mark.slow
def test_resnet18_compiles_whole_with_inductor():
    """Inductor generates its own kernels (reductions in another order): float32 tolerances looser by 10x."""
    model, x = cosconvert.convert(torchvision.models.resnet18()), torch.randn(2, 3, 32, 32)
    check_compiled(model, x, backend="inductor", rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_mobilenet_v3_small_compiles_whole():
    check_compiled(cosconvert.convert(torchvision.models.mobilenet_v3_small()), torch.randn(2, 3, 32, 32))


@pytest.mark.slow
def test_vit_b_16_compiles_whole():
    converted = cosconvert.convert(torchvision.models.vit_b_16(image_size=32))
    attention = converted.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert isinstance(attention, CosineMultiheadAttention)
    check_compiled(converted, torch.randn(2, 3, 32, 32))


def test_compiles_where_dynamo_folds_is_exporting_to_true(monkeypatch):
    """torch 2.11's dynamo answers ``torch.compiler.is_exporting()`` with True under plain torch.compile;
    the layers must still take their compiled path (with a backward), not the export op (which has none)."""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: torch.compiler.is_compiling())
    model = cosconvert.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)))
    check_compiled(model, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 3, 9, 10), (3, 3), 2, 1),
        ((2, 3, 9, 10), (3, 2), (1, 2), (2, 1)),
        ((2, 3, 12, 11), (5, 5), 1, 2),
        ((2, 3, 23, 21), (7, 7), 2, 3),
        ((2, 4, 11, 12), (5, 7), (1, 2), (2, 3)),
        ((1, 2, 6, 7, 8), (3, 3, 3), (1, 2, 1), 1),
        ((2, 3, 17), (5,), 2, 4),
    ],
    ids=["3x3 /2", "3x2 wide pads", "5x5", "7x7 stem", "5x7", "3x3x3", "1d"],
)
def test_compiled_windows_match_the_reference(shape, kernel, stride, padding, centered):
    """Compiled on the CPU, a window sum of at most 25 taps (9, 6, 25) is a sum pool over the input
    padded first, so pads may exceed half the kernel ("wide pads", which a pool could not pad); one of
    more taps (49, 35, 27) is pooled one axis at a time, the pool padding itself; 1d takes the
    convolution of ones. Every receptive field's cosine against the float64 unfold reference."""
    x, w = torch.randn(shape) + 0.3, torch.randn(5, shape[1], *kernel)
    conv = {1: CF.cosine_conv1d, 2: CF.cosine_conv2d, 3: CF.cosine_conv3d}[len(kernel)]
    compiled = torch.compile(
        lambda x, w: conv(x, w, None, stride, padding, centered=centered), fullgraph=True, backend="aot_eager"
    )
    expected = cosine_reference(x.double(), w.double(), None, stride, padding, centered=centered)
    torch.testing.assert_close(compiled(x, w).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [((2, 3, 9, 10), (3, 3), 2, 1), ((2, 3, 23, 21), (7, 7), 2, 3), ((1, 2, 6, 7, 8), (3, 3, 3), (1, 2, 1), 1)],
    ids=["3x3 /2", "7x7 stem", "3x3x3"],
)
def test_sum_pool_that_pads_matches_a_convolution_of_ones(shape, kernel, stride, padding):
    """The compiled window sum's pool that pads the input itself (off the CPU, and on it for windows
    pooled one axis at a time): its sums against a grouped convolution of ones, in float64."""
    x = torch.rand(shape, dtype=torch.float64)
    conv = {2: F.conv2d, 3: F.conv3d}[len(kernel)]
    expected = conv(x, x.new_ones(shape[1], 1, *kernel), None, stride, padding, 1, shape[1])
    torch.testing.assert_close(CF._sum_pool(x, kernel, stride, padding), expected)
    assert not CF._poolable((3, 2), (2, 1), 1, padded=False)  # a pool pads at most half its kernel
