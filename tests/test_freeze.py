"""freeze(): weights normalized once for inference, in modules and functional calls alike."""

import torch
import torch.nn.functional as F
import torchvision
from reference import cosine_reference, linear_reference
from test_convert import Functional

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


def test_frozen_resnet_computes_what_the_converted_one_does():
    torch.manual_seed(0)
    converted = cosconvert.convert(torchvision.models.resnet18(num_classes=10).eval(), centered=True)
    frozen = cosconvert.freeze(converted)
    assert not frozen.training
    assert all(m.prenormalized and m.gain is None for m in frozen.modules() if hasattr(m, "prenormalized"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), converted(x), atol=1e-5, rtol=1e-5)
