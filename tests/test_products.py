"""Linear layers written as products with a weight (issue 27): ``torch.einsum``, ``x @ W.T``,
``W @ x``, grouped experts' ``torch._grouped_mm``, and the dot products cosconvert leaves alone
(transposed convolutions, an einsum that is no linear map), in a user's own network.

Each is judged against :mod:`faithful_reference`, the original run in float64 with every dot product
(products with a weight included) replaced by the cosine of what it receives, and against the
report: converted, or listed under ``skipped`` with a reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from faithful_reference import reference_outputs
from torch import nn

import cosconvert
from cosconvert.calls import DotProductCalls


class Products(nn.Module):
    """Every spelling of a linear layer with a weight that is no ``F.linear`` call of a module."""

    def __init__(self) -> None:
        super().__init__()
        self.w_einsum = nn.Parameter(torch.randn(16, 8))  # (out, in), as einsum "bd,hd->bh"
        self.w_matmul = nn.Parameter(torch.randn(16, 16))  # x @ W.T
        self.w_left = nn.Parameter(torch.randn(8, 16))  # W @ x.T
        self.experts = nn.Parameter(torch.randn(2, 8, 4))  # (experts, in, out)
        self.register_buffer("offs", torch.tensor([3, 6], dtype=torch.int32))
        self.up = nn.ConvTranspose2d(1, 2, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bd,hd->bh", x, self.w_einsum).relu()
        h = torch.matmul(h, self.w_matmul.T).relu()
        h = (self.w_left @ h.T).T.contiguous()  # _grouped_mm wants 16-byte strides
        h = torch._grouped_mm(h, self.experts, offs=self.offs)  # tokens 0-2 to expert 0, 3-5 to expert 1
        return self.up(h.view(-1, 1, 2, 2)).flatten(1)


class ProductsFallback(Products):
    """The same, with a branch on the data: it runs by fallback, under CosineCalls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return super().forward(x)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("cls", [Products, ProductsFallback])
def test_weight_products_are_converted_and_faithful(cls):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(6, 8)
    converted = cosconvert.convert(model, gain="none", example_inputs=(x,))
    report = converted.cosine_report
    skipped = {row["name"]: row["reason"] for row in report.skipped}
    assert "transposed convolution" in skipped.get("up", ""), report.skipped
    ref, mode = reference_outputs(model, x, skip=["up"])
    assert mode.calls == {"einsum": 1, "matmul": 2, "grouped_mm": 1}, mode.calls
    with torch.no_grad():
        assert _rel(converted(x), ref) < 1e-5
    if cls is Products:  # one graph: each product is a node pointed at its cosine twin
        sources = sorted(row["source"] for row in report.converted)
        assert sources == ["_grouped_mm", "einsum", "matmul", "matmul"], report.converted
    else:
        assert report.fallbacks and "0 layer calls ran as plain" in report.checks["run-time check"]


def test_product_gains_are_per_output_unit():
    """gain="channel": one gain per output unit of each product's weight; at 1 the output is the
    gain-free cosine, and a changed gain changes the output."""
    torch.manual_seed(0)
    model, x = Products().eval(), torch.randn(6, 8)
    plain = cosconvert.convert(model, gain="none", example_inputs=(x,))
    gained = cosconvert.convert(model, gain="channel", example_inputs=(x,))
    shapes = sorted(tuple(p.shape) for n, p in gained.named_parameters() if n.startswith("cosine_gain"))
    # einsum's W (16, 8) contracts its last dim; W.T (16, 16) its first; W @ x: W (8, 16) its last; experts dim 1
    assert shapes == [(1, 16), (2, 1, 4), (8, 1), (16, 1)], shapes
    with torch.no_grad():
        torch.testing.assert_close(gained(x), plain(x))
        einsum_gain = next(
            p for n, p in gained.named_parameters() if n.startswith("cosine_gain") and p.shape == (16, 1)
        )
        einsum_gain[0].mul_(3)  # one unit: the next cosine sees another direction
        assert not torch.allclose(gained(x), plain(x))


class NotLinear(nn.Module):
    """An einsum that sums over a dimension of the weight alone, and a functional transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 3))
        self.k = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bd,hdk->bh", x, self.w)
        return F.conv_transpose2d(y.view(-1, 2, 1, 2), self.k).flatten(1)


def test_dot_products_left_alone_are_reported():
    model, x = NotLinear().eval(), torch.randn(2, 8)
    report = cosconvert.convert(model, example_inputs=(x,)).cosine_report
    reasons = {row["type"]: row["reason"] for row in report.skipped}
    assert "no linear map" in reasons.get("einsum", ""), report.skipped
    assert "transposed convolution" in reasons.get("conv_transpose2d", ""), report.skipped
    assert not report.converted


def test_run_time_check_sees_inside_functional_attention():
    """``F.multi_head_attention_forward`` makes its projections inside, where a TorchFunctionMode is
    off: the run-time check must still see them (WavLM calls it with its own projection weights)."""
    mha = nn.MultiheadAttention(8, 2)
    q = torch.randn(3, 1, 8)
    with DotProductCalls() as calls:
        F.multi_head_attention_forward(
            q, q, q, 8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
            mha.out_proj.weight, mha.out_proj.bias, training=False,
        )  # fmt: skip
    assert [name for name, _ in calls.plain] == ["linear", "linear"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


class Top(nn.Module):
    """A root that runs by fallback around a traced block with a normalizer."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return self.head(self.block(x))


@pytest.mark.parametrize("mode", ["drop", "fold"])
def test_stripped_normalizer_prints_as_what_runs(mode):
    converted = cosconvert.convert(Top().eval(), strip_norms=mode, example_inputs=(torch.randn(2, 8),))
    assert isinstance(converted.block.norm, nn.Identity), converted
    assert "LayerNorm" not in str(converted)


class Gates(nn.Module):
    """RecurrentGemma's gates: ``torch.baddbmm(bias, x, W)`` with a weight per head, ``W (heads, in, out)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 4, 4))
        self.bias = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (tokens, 8) -> (tokens, 8)
        heads = x.view(-1, 2, 4).transpose(0, 1)
        out = torch.baddbmm(self.bias[:, None, :], heads, self.weight)
        return torch.sigmoid(out.transpose(0, 1).reshape(x.shape))


class GatesFallback(Gates):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return super().forward(x)


@pytest.mark.parametrize("cls", [Gates, GatesFallback])
def test_a_batched_product_with_a_weight_and_a_bias_is_converted(cls):
    """``baddbmm`` is ``bias + x @ W`` per head: converted (graph and fallback alike) and faithful."""
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(5, 8)
    converted = cosconvert.convert(model, gain="none", example_inputs=(x,))
    ref, mode = reference_outputs(model, x)
    assert mode.calls["baddbmm"] == 1
    with torch.no_grad():
        assert _rel(converted(x), ref) < 1e-5
    assert not converted.cosine_report.skipped
