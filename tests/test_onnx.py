"""Export to ONNX with custom ops, run on the real onnxruntime, and validate against PyTorch."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from broken import spoil_cosine_conv
from onnx.reference import ReferenceEvaluator
from reference import cosine_reference, linear_reference
from test_convert import Functional
from torch import nn
from torchvision.models import VisionTransformer

import cosconvert
import cosconvert.functional as CF
from cosconvert.nn import CosineConv2d, CosineLinear
from cosconvert.onnx.functions import DOMAIN


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(4, 8, 5, padding=2, padding_mode="reflect"), nn.BatchNorm1d(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3, stride=2, dilation=2, groups=2), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        return self.head(self.body(x))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(2, 6, 3, padding="same"), nn.GroupNorm(2, 6), nn.ReLU(),
            nn.Conv3d(6, 6, 2, stride=2, padding=1, groups=6), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x))


def encoder():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(16 * 5, 7)
    )


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(), (3, 64, 64)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (3, 64, 64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (3, 64, 64)),
    # torchvision's VisionTransformer (vit_b_16's class, nn.MultiheadAttention inside) at a small size
    "vit": (lambda: VisionTransformer(64, 16, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128), (3, 64, 64)),
    "conv1d": (Conv1dNet, (4, 32)),
    "conv3d": (Conv3dNet, (2, 6, 8, 8)),
    "transformer_encoder": (encoder, (5, 16)),
    "functional": (Functional, (3, 8, 8)),
}


@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_and_validate_on_onnxruntime(tmp_path, name, centered):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = cosconvert.convert(build().eval(), centered=centered, strip_norms="fold")
    path = cosconvert.export_onnx(model, torch.randn(2, *shape), tmp_path / "model.onnx")
    proto = onnx.load(path)
    custom = {n.op_type for n in proto.graph.node if n.domain == DOMAIN}
    assert custom and custom <= {"CosineConv", "CosineLinear"}
    assert {f.name for f in proto.functions} == custom  # every custom op carries its body
    norm_ops = {"ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Reciprocal"}
    assert not norm_ops & {n.op_type for n in proto.graph.node}  # weights were normalized once, at export
    report = cosconvert.validate(path, model, [torch.randn(1, *shape), torch.randn(3, *shape)], providers="auto")
    print(report)
    [cpu] = [r for r in report.results if r.provider == "CPUExecutionProvider"]
    assert report.batch_sizes == [1, 3]
    assert cpu.passed and cpu.max_rel_error <= 1e-4
    assert cpu.top1_agreement == 100.0


BODY_PATHS = {  # (in, out, kernel, stride, padding, groups): each path through CosineConv's body
    "dense 3x3": (4, 6, 3, 1, 1, 1),
    "pointwise": (4, 6, 1, 1, 0, 1),  # the window sum is the identity
    "pointwise stride 2": (4, 6, 1, 2, 0, 1),
    "pointwise padded": (4, 6, 1, 1, 1, 1),
    "depthwise": (4, 4, 3, 2, 1, 4),
    "depthwise pointwise": (4, 8, 1, 1, 0, 4),  # a field is one value
    "depthwise x2": (4, 8, 3, 1, 1, 4),  # two filters per channel: outputs regrouped to scale
    "grouped": (6, 4, 3, 1, 1, 2),
}


def _file_gives(layer: nn.Module, x: torch.Tensor, expected, tmp_path, atol: float) -> Path:
    """Export ``layer``; onnxruntime and onnx's ReferenceEvaluator must both give ``expected`` on ``x``."""
    path = cosconvert.export_onnx(layer, x[:1], tmp_path / "layer.onnx")
    feed = {onnx.load(path).graph.input[0].name: x.numpy()}
    (on_ort,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    (on_reference,) = ReferenceEvaluator(str(path)).run(None, feed)
    np.testing.assert_allclose(on_ort, expected, atol=atol, rtol=0)
    np.testing.assert_allclose(on_reference, expected, atol=atol, rtol=0)
    return path


@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
@pytest.mark.parametrize("case", list(BODY_PATHS))
def test_conv_function_body_matches_reference(tmp_path, case, centered):
    """One CosineConv node, run as its body by onnxruntime and onnx's ReferenceEvaluator, against the
    float64 unfold reference; zero fields too (a zero sample, a zero patch), which give the bias."""
    c_in, c_out, k, stride, padding, groups = BODY_PATHS[case]
    layer = CosineConv2d(c_in, c_out, k, stride, padding, groups=groups, centered=centered).eval()
    x = torch.randn(3, c_in, 7, 7)
    x[1], x[2, :, 2:5, 2:5] = 0, 0
    with torch.no_grad():
        expected = cosine_reference(x, layer.weight, layer.bias, stride, padding, 1, groups, centered=centered).numpy()
    path = _file_gives(layer, x, expected, tmp_path, atol=1e-5)
    assert [n.op_type for n in onnx.load(path).graph.node] == ["CosineConv"]


@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
def test_linear_function_body_matches_reference(tmp_path, centered):
    """One CosineLinear node on onnxruntime and onnx's ReferenceEvaluator against the float64
    reference, a zero row and a constant row included (both give the bias in the centered form; the
    zero row in the plain one)."""
    torch.manual_seed(0)
    plain = nn.Linear(16, 5)
    layer = CosineLinear.from_module(plain, centered=centered).eval()
    x = torch.randn(4, 16)
    x[1], x[2] = 0, 3.0
    with torch.no_grad():
        expected = linear_reference(x, plain.weight, plain.bias, centered=centered, gain=layer.gain).numpy()
    _file_gives(layer, x, expected, tmp_path, atol=1e-5)


OFFSET_CASES = {name: BODY_PATHS[name] for name in ("dense 3x3", "pointwise padded", "depthwise", "grouped")}


@pytest.mark.parametrize("case", [*OFFSET_CASES, "linear"])
def test_centered_on_offset_input_matches_reference(tmp_path, case):
    """Inputs whose mean is 100 times their spread: the centered energy S2 - S1^2 / n cancels in
    float32 unless formed from shifted values. PyTorch, onnxruntime and the ReferenceEvaluator
    against the float64 reference (the unshifted float32 body was off by 3e-4 to 4e-3)."""
    torch.manual_seed(0)
    if case == "linear":
        layer, x = nn.Linear(16, 5), 100 + torch.randn(3, 16)
        expected = linear_reference(x, layer.weight.detach(), layer.bias.detach(), centered=True)
        layer = CosineLinear.from_module(layer, centered=True).eval()
    else:
        c_in, c_out, k, stride, padding, groups = OFFSET_CASES[case]
        layer = CosineConv2d(c_in, c_out, k, stride, padding, groups=groups, centered=True).eval()
        x = 100 + torch.randn(3, c_in, 7, 7)
        w, b = layer.weight.detach(), layer.bias.detach()
        expected = cosine_reference(x, w, b, stride, padding, 1, groups, centered=True)
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double(), expected, atol=5e-5, rtol=0)
    _file_gives(layer, x, expected.numpy(), tmp_path, atol=5e-5)


@pytest.mark.parametrize("case", ["dense 3x3", "depthwise"])
def test_centered_on_small_field_in_large_channel_matches_reference(tmp_path, case):
    """The opposite of an offset input, as after a ReLU in mobilenet: a patch of zeros and one small
    value inside channels whose mean is large. Shifting these fields by the channel's mean would
    cancel (rel 6.8e-2 on mobilenet_v3_small, 1e-3 on this layer), so they must keep their plain sums."""
    c_in, c_out, k, stride, padding, groups = BODY_PATHS[case]
    torch.manual_seed(0)
    layer = CosineConv2d(c_in, c_out, k, stride, padding, groups=groups, centered=True).eval()
    x = 5 + 0.1 * torch.randn(3, c_in, 9, 9)
    x[:, :, :4, :4] = 0  # fields at the top-left corner: padding, zeros
    x[:, :, 1, 1] = 1e-3  # and one small value
    w, b = layer.weight.detach(), layer.bias.detach()
    expected = cosine_reference(x, w, b, stride, padding, 1, groups, centered=True).numpy()
    _file_gives(layer, x, expected, tmp_path, atol=5e-5)


def test_inline_leaves_standard_ops_and_reference_evaluator_agrees(tmp_path):
    model = cosconvert.convert(Conv1dNet().eval(), centered=True)
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    path = cosconvert.export_onnx(model, x[:1], tmp_path / "functions.onnx")
    inlined = cosconvert.export_onnx(model, x[:1], tmp_path / "inline.onnx", inline=True)
    proto = onnx.load(inlined)
    assert not proto.functions and all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert "If" not in {n.op_type for n in proto.graph.node}  # the bodies' branches were folded
    assert all(o.domain != DOMAIN for o in proto.opset_import)
    for file in (path, inlined):
        (out,) = ReferenceEvaluator(str(file)).run(None, {"x": x.numpy()})
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_broken_function_body_fails_and_names_the_node(tmp_path):
    model = cosconvert.convert(Conv1dNet().eval())
    path = cosconvert.export_onnx(model, torch.randn(1, 4, 32), tmp_path / "model.onnx")
    first_conv = spoil_cosine_conv(path, tmp_path / "broken.onnx")
    report = cosconvert.validate(tmp_path / "broken.onnx", model, providers="CPUExecutionProvider")
    assert not report.passed
    assert report.results[0].first_divergence == f"{first_conv} (CosineConv)"
    (tmp_path / "report.json").write_text(report.to_json())


def test_fp16_export_runs_within_half_tolerance(tmp_path):
    model = cosconvert.convert(Conv1dNet().eval())
    path = cosconvert.export_onnx(model, torch.randn(1, 4, 32), tmp_path / "half.onnx", fp16=True)
    report = cosconvert.validate(path, model.half(), providers="CPUExecutionProvider")
    assert report.dtype == "float16" and report.passed, report


def test_dynamic_batch_and_atomic_write(tmp_path):
    model = cosconvert.convert(Conv3dNet().eval())
    path = cosconvert.export_onnx(model, torch.randn(2, 2, 6, 8, 8), tmp_path / "m.onnx")
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left behind
    fixed = cosconvert.export_onnx(model, torch.randn(2, 2, 6, 8, 8), tmp_path / "f.onnx", dynamic_batch=False)
    assert onnx.load(fixed).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_functional_model_output_is_a_cosine(tmp_path):
    # Independent of the package's math: the exported linear layer's output is bounded like a cosine.
    model = cosconvert.convert(nn.Sequential(nn.Linear(6, 3)), gain="none").eval()
    path = cosconvert.export_onnx(model, torch.randn(2, 6), tmp_path / "lin.onnx")
    x = torch.randn(4, 6)
    (out,) = ReferenceEvaluator(str(path)).run(None, {onnx.load(path).graph.input[0].name: x.numpy()})
    w = model.get_submodule("0").weight.detach()
    ref = (
        F.cosine_similarity(x[:, None, :].double(), w[None].double(), dim=-1)
        + model.get_submodule("0").bias.detach().double()
    )
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-6)


def test_external_data_file_is_written_beside_the_model(tmp_path):
    """The >2 GB path (weights in <name>.data), taken here at a lower size so it runs in CI."""
    from cosconvert.onnx.export import _write

    model = cosconvert.convert(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval())
    small = cosconvert.export_onnx(model, torch.randn(1, 64), tmp_path / "small.onnx")
    proto = onnx.load(small)
    out = tmp_path / "split"
    out.mkdir()
    _write(proto, out / "model.onnx", external_above=1024)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx").stat().st_size < small.stat().st_size
    report = cosconvert.validate(out / "model.onnx", model, providers="CPUExecutionProvider")
    assert report.passed


@pytest.mark.slow
@pytest.mark.xdist_group("memory")  # never beside the torchvision sweep's largest models
def test_model_over_2gb_exports_with_external_data(tmp_path):
    """A real 2.15 GB network (one 23200x23200 cosine layer): weights go to model.onnx.data and the
    pair validates on onnxruntime. About 50 s and 11 GB of memory here."""
    torch.manual_seed(0)
    model = cosconvert.convert(nn.Sequential(nn.Linear(23200, 23200)))
    path = cosconvert.export_onnx(model, torch.randn(1, 23200), tmp_path / "model.onnx")
    files = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(files) == {"model.onnx", "model.onnx.data"}
    assert files["model.onnx.data"] > 2**31 and files["model.onnx"] < 2**20
    report = cosconvert.validate(path, model, [torch.randn(1, 23200), torch.randn(3, 23200)], repeat=1,
                                 providers="CPUExecutionProvider")  # fmt: skip
    assert report.passed


class TokenNet(nn.Module):
    """Token ids and a mask of one length: embeddings, masked mean over the sequence, a linear head."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 6), nn.Linear(6, 3)

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).to(torch.float32)
        return self.head((self.embed(ids) * m).sum(1) / m.sum(1).clamp(min=1))


def test_token_inputs_export_with_a_dynamic_sequence(tmp_path):
    # Traced at 7 tokens, run at 11 (and batch 3): the sequence axis of integer inputs is dynamic.
    torch.manual_seed(0)
    model = cosconvert.convert(TokenNet().eval(), gain="none").eval()
    ids, mask = torch.randint(0, 20, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    path = cosconvert.export_onnx(model, (ids, mask), tmp_path / "tok.onnx")
    ids, mask = torch.randint(0, 20, (3, 11)), (torch.rand(3, 11) > 0.3).long()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})
    m = mask.unsqueeze(-1).double()
    pooled = (model.embed.weight.detach().double()[ids] * m).sum(1) / m.sum(1).clamp(min=1)
    ref = linear_reference(pooled, model.head.weight.detach().double(), model.head.bias.detach().double())
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_a_fixed_sequence_is_one_clear_error(tmp_path):
    # A model with one position embedding per token of 7 cannot take a dynamic sequence: the error says so.
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos, self.head = nn.Embedding(20, 2), nn.Parameter(torch.randn(7, 2)), nn.Linear(2, 3)

        def forward(self, ids):
            return self.head((self.embed(ids) + self.pos).mean(1))

    model = cosconvert.convert(Flat().eval()).eval()
    with pytest.raises(cosconvert.onnx.export.ExportError, match="sequence") as err:
        cosconvert.export_onnx(model, torch.randint(0, 20, (2, 7)), tmp_path / "f.onnx")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())
    path = cosconvert.export_onnx(model, torch.randint(0, 20, (2, 7)), tmp_path / "f.onnx", dynamic_shapes=[{}])
    assert path.exists()


class RawWeightCalls(nn.Module):
    """Calls the normalized-weight functions directly with a raw weight and its ``unit_scale``."""

    def __init__(self):
        super().__init__()
        self.conv, self.linear = nn.Parameter(torch.randn(6, 4, 3, 3)), nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        y = CF.conv_normalized(x, self.conv, None, 1, 1, unit_scale=CF.weight_inverse_norm(self.conv))
        return CF.linear_normalized(y.mean((2, 3)), self.linear, unit_scale=CF.weight_inverse_norm(self.linear))


def test_unit_scale_survives_export(tmp_path):
    """The export ops take one weight: a given ``unit_scale`` is folded into it, not dropped."""
    model, x = RawWeightCalls().eval(), torch.randn(2, 4, 8, 8)
    path = cosconvert.export_onnx(model, x, tmp_path / "raw.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        pooled = cosine_reference(x.double(), model.conv.double(), None, 1, 1).mean((2, 3))
        expected = linear_reference(pooled, model.linear.double())
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5, rtol=0)


def test_exports_from_a_source_checkout_that_is_not_installed(tmp_path, monkeypatch):
    """Run from a checkout on PYTHONPATH (as on a GPU machine with no package index), cosconvert has no
    installed metadata: the file says so instead of the export failing on the version lookup."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    path = cosconvert.export_onnx(cosconvert.convert(nn.Linear(4, 3)), torch.randn(1, 4), tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["cosconvert_version"] == "unknown (not installed)"
