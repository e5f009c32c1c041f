"""CosineConfig: one validated settings object, carried to every part of a conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cosconvert
from cosconvert import CosineConfig, RunSettings
from cosconvert.errors import InputError


class OptionalInput(nn.Module):
    """Its forward takes an optional input, so convert runs it by fallback (under CosineCalls)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 8))
        self.fc = nn.Linear(5, 3)

    def forward(self, x, scale=None):
        h = F.linear(x, self.w)
        return self.fc(h if scale is None else h * scale)


def pearson(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` against rows of ``w``, centered, in float64: the reference."""
    x, w = x.double(), w.double()
    x, w = x - x.mean(-1, keepdim=True), w - w.mean(-1, keepdim=True)
    return (x @ w.T) / (x.norm(dim=-1, keepdim=True) * w.norm(dim=-1))


def test_a_config_reaches_the_calls_run_by_fallback():
    """``centered`` and ``gain`` of the config given to convert hold in a fallback's own calls and its layers."""
    torch.manual_seed(0)
    model, x = OptionalInput().eval(), torch.randn(4, 8)
    config = CosineConfig(centered=True, gain="none")
    converted = cosconvert.convert(model, config, example_inputs=(x,))
    assert converted.cosine_report.fallbacks, "the model must run by fallback for this test"
    assert converted.cosine_report.settings == config.to_dict()
    want = pearson(pearson(x, model.w).float(), model.fc.weight) + model.fc.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(converted(x).double(), want, rtol=1e-5, atol=1e-6)


def test_keywords_change_the_fields_of_a_config():
    converted = cosconvert.convert(nn.Linear(4, 2), CosineConfig(centered=True), gain="scalar")
    assert converted.cosine_report.settings["centered"] is True
    assert converted.gain.shape == (1,)


@pytest.mark.parametrize(
    "bad, match",
    [({"gain": "big"}, "gain"), ({"strip_norms": "yes"}, "strip_norms"), ({"eps": 0.0}, "eps")],
)
def test_bad_settings_are_refused_once_with_the_field_named(bad, match):
    with pytest.raises(ValueError, match=match):
        CosineConfig(**bad)
    with pytest.raises(InputError, match=match):
        RunSettings.of(**bad)


def test_run_settings_name_an_unknown_keyword():
    with pytest.raises(InputError, match="gian"):
        RunSettings.of(gian="channel")


def test_a_config_round_trips_through_plain_data_types_included():
    config = CosineConfig(centered=True, strip_norms="fold", exclude=[nn.Linear, "head.*"], include="block*")
    data = config.to_dict()
    assert data["exclude"] == ["torch.nn.modules.linear:Linear", "head.*"] and data["include"] == ["block*"]
    assert CosineConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="centred"):
        CosineConfig.from_dict({**data, "centred": True})
