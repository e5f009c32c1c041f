"""freeze(): weights normalized once for inference, in modules and functional calls alike."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference import cosine_reference, linear_reference
from test_convert import Functional
from torch import nn

import cosconvert
from cosconvert import functional as CF


def test_frozen_functional_model_matches_reference_and_normalizes_once():
    torch.manual_seed(0)
    model = Functional()
    converted = cosconvert.convert(model, gain="channel")
    with torch.no_grad():  # a gain that is not one, so folding it into the weight is checked too
        for name, p in converted.named_parameters():
            if "gain" in name:
                p.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    frozen = cosconvert.freeze(converted)
    targets = {n.target for n in frozen.graph.nodes if n.op == "call_function"}
    assert {CF.conv_normalized, CF.linear_normalized} <= targets
    assert not targets & {CF.cosine_conv2d, CF.cosine_linear}  # no weight normalization per call left
    x = torch.randn(2, 3, 6, 6)
    conv_gain, linear_gain = converted.cosine_gain_0, converted.cosine_gain_1
    h = cosine_reference(x, model.w1, padding=1, gain=conv_gain)
    h = F.relu(F.group_norm(h, 2, model.gn_w.double(), model.gn_b.double()))
    ref = linear_reference(F.layer_norm(h.mean((2, 3)), (8,)), model.w2, gain=linear_gain)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x).double(), ref, atol=1e-5, rtol=0)
    after = converted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # not touched


def _gains(model) -> list[torch.Tensor]:
    return [m.gain for m in model.modules() if getattr(m, "gain", None) is not None]


@pytest.mark.slow
def test_frozen_resnet_computes_what_the_converted_one_does():
    """With gains far from one (random, per unit), the frozen resnet computes the converted one."""
    torch.manual_seed(0)
    converted = cosconvert.convert(torchvision.models.resnet18(num_classes=10).eval(), centered=True)
    with torch.no_grad():
        for gain in _gains(converted):
            gain.copy_(torch.rand_like(gain) * 1.5 + 0.5)
    frozen = cosconvert.freeze(converted)
    assert not frozen.training
    assert all(m.prenormalized and m.gain is None for m in frozen.modules() if hasattr(m, "prenormalized"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), converted(x), atol=1e-5, rtol=1e-5)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
def test_frozen_model_with_calibrated_gains_matches_reference(centered):
    """Calibrated (and BN-folded) gains and biases, folded into the weights by freeze: the frozen model
    equals the float64 reference of each layer's cosine times its gain plus its bias."""
    torch.manual_seed(0)
    original = SmallCNN().eval()
    batches = [torch.randn(8, 3, 8, 8) * 2 + 0.5 for _ in range(2)]
    converted = cosconvert.convert(original, strip_norms="fold", centered=centered, calibration_data=batches)
    gains = _gains(converted)
    assert len(gains) == 3 and all(g.numel() > 1 for g in gains)
    assert min(g.std().item() for g in gains) > 0.01 and max((g - 1).abs().max().item() for g in gains) > 0.5
    frozen = cosconvert.freeze(converted)
    c1, c2, fc = (converted.get_submodule(n) for n in ("conv1", "conv2", "fc"))
    x = torch.randn(3, 3, 8, 8)
    h = F.relu(cosine_reference(x, c1.weight, c1.bias, padding=1, centered=centered, gain=c1.gain))
    h = F.relu(cosine_reference(h, c2.weight, c2.bias, 2, 1, groups=3, centered=centered, gain=c2.gain))
    ref = linear_reference(h.mean((2, 3)), fc.weight, fc.bias, centered=centered, gain=fc.gain).detach()
    with torch.no_grad():
        torch.testing.assert_close(frozen(x).double(), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(converted(x).double(), ref, atol=2e-5, rtol=1e-5)
