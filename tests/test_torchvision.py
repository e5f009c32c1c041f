"""Every torchvision classification model converts, with and without stripping normalizers."""

import gc

import pytest
import torch
import torchvision
from helpers import norm_layers, plain_layers, run_and_spy

import cosconvert

MODELS = torchvision.models.list_models(module=torchvision.models)
FAST = {"resnet18", "mobilenet_v3_small", "vit_b_16", "swin_t", "squeezenet1_0"}


def _size(name: str) -> int:
    if name.startswith(("vit", "maxvit")):
        return 224  # fixed image size / partition sizes
    return 96 if name.startswith("inception") else 64


# Under `pytest -n 2 --dist loadgroup` the sweep runs on one worker, never beside the 2 GB export test
# (test_onnx.py, same group): both hold gigabytes.
SWEEP = pytest.mark.xdist_group("memory")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=SWEEP if n in FAST else (SWEEP, pytest.mark.slow)) for n in MODELS]
)
def test_converts(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, _size(name), _size(name))
    with torch.no_grad():
        expected = model(x).shape
    # A model of over 100M parameters takes one pass: its smaller siblings (same code) take both.
    big = sum(p.numel() for p in model.parameters()) > 100e6
    for strip in ["fold"] if big else [False, "fold"]:
        conv = cosconvert.convert(model, strip_norms=strip)
        assert plain_layers(conv) == [], conv.cosine_report.skipped
        out, dots, norms = run_and_spy(conv, x)
        assert dots == [], dots[:3]
        assert out.shape == expected and torch.isfinite(out).all()
        if strip:
            assert norm_layers(conv) == [] and norms == []
        del conv
        gc.collect()
