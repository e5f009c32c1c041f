"""Faithful conversion mechanisms (issue 10) on small hand-made models, each judged against the
original run under the float64 reference mode (tests/faithful_reference.py): every layer call
replaced by the cosine of the operands it really receives."""

import math

import pytest
import torch
import torch.nn.functional as F
from faithful_reference import reference_outputs
from reference import linear_reference
from torch import nn

import cosconvert
from cosconvert.load import load_model


def rel(out, ref) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def assert_faithful(model, *args, **kwargs):
    """Convert with gain none, run on ``args``, compare with the reference; returns the converted model."""
    converted = cosconvert.convert(model, gain="none")
    with torch.no_grad():
        out = converted(*args, **kwargs)
    ref, mode = reference_outputs(model, *args, **kwargs)
    assert sum(mode.calls.values()) > 0
    assert rel(out, ref) < 1e-5, converted.cosine_report
    return converted


class StaticSame(nn.Conv2d):
    """Asymmetric 'same' padding in its own forward, from the input's shape (traceable)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSame(nn.Conv2d):
    """timm's Conv2dSame: padding computed with math.ceil on the input size (fx cannot trace it)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight standardized by F.batch_norm in its forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class LoRA(nn.Linear):
    """A LoRA-style wrapper: the base layer plus a low-rank branch of two layers."""

    def __init__(self, n_in, n_out, rank=2):
        super().__init__(n_in, n_out)
        self.lora_a, self.lora_b = nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 0.5 * self.lora_b(self.lora_a(x))


def convnet(conv_cls):
    return nn.Sequential(
        conv_cls(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), conv_cls(6, 4, 3), nn.Flatten(1)
    ).eval()


@pytest.mark.parametrize("conv_cls", [StaticSame, DynamicSame, StdConv])
def test_conv_subclass_with_own_forward_keeps_its_semantics(conv_cls):
    model = convnet(conv_cls)
    x = torch.randn(2, 3, 9, 11)
    converted = assert_faithful(model, x)
    assert_faithful(model, torch.randn(3, 3, 12, 7))  # another size pads differently
    names = {row["name"].split(".")[0] for row in converted.cosine_report.converted}
    assert names == {"0", "3"} and not converted.cosine_report.skipped


def test_include_selects_a_layer_with_its_own_forward_by_its_name():
    converted = cosconvert.convert(convnet(StdConv), include=["3"])
    report = converted.cosine_report
    assert [row["name"] for row in report.converted] == ["3.conv2d"]
    assert [row["name"] for row in report.skipped] == ["0"]


def test_weight_normalizer_is_never_stripped_and_gains_are_per_channel():
    model = convnet(StdConv)
    x = torch.randn(2, 3, 9, 9)
    converted = cosconvert.convert(model, strip_norms="drop", gain="channel")
    stripped = [row["name"] for row in converted.cosine_report.stripped]
    assert stripped == ["1"]  # the BatchNorm2d on the activations only
    gains = sorted(p.numel() for name, p in converted.named_parameters() if "gain" in name)
    assert gains == [4, 6]
    without_bn = nn.Sequential(model[0], model[2], model[3], model[4])
    ref, _ = reference_outputs(without_bn, x)
    with torch.no_grad():
        assert rel(converted(x), ref) < 1e-5


def test_lora_wrapper_converts_base_and_branch():
    model = nn.Sequential(LoRA(8, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 8)
    converted = assert_faithful(model, x)
    a, b = model[0].lora_a.weight, model[0].lora_b.weight
    base = linear_reference(x, model[0].weight, model[0].bias)
    h = torch.relu(base + 0.5 * linear_reference(linear_reference(x, a), b))
    with torch.no_grad():
        assert rel(converted(x), linear_reference(h, model[2].weight, model[2].bias)) < 1e-5


class Conv1DLike(nn.Module):
    """transformers' Conv1D: a linear layer computed by addmm, weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class TinyAttention(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.qkv, self.proj = Conv1DLike(3 * dim, dim), Conv1DLike(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)  # q.k stays a product


def test_addmm_linear_layer_is_converted_and_activation_products_are_not():
    model = TinyAttention().eval()
    x = torch.randn(2, 5, 8)
    converted = assert_faithful(model, x)
    sources = sorted(row["source"] for row in converted.cosine_report.converted)
    assert sources == ["addmm", "addmm"]


class TextModel(nn.Module):
    """Optional inputs, as transformers models have them: ids or embeddings, an optional mask."""

    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(20, 8), TinyAttention(), nn.Linear(8, 3)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give input_ids or inputs_embeds")
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(self.attn(h))


def test_optional_inputs_run_in_every_combination():
    model = TextModel().eval()
    converted = cosconvert.convert(model, gain="none")
    ids, mask = torch.randint(20, (3, 6)), torch.ones(3, 6)
    mask[0, 3:] = 0
    for kwargs in [{"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :4]},
                   {"inputs_embeds": torch.randn(2, 5, 8)}]:  # fmt: skip
        with torch.no_grad():
            out = converted(**kwargs)
        ref, _ = reference_outputs(model, **kwargs)
        assert rel(out, ref) < 1e-5, kwargs
    assert any("optional inputs" in row["reason"] for row in converted.cosine_report.fallbacks)
    checked = cosconvert.convert(model, gain="none", example_inputs={"input_ids": ids, "attention_mask": mask})
    assert checked.cosine_report.checks["inputs"] == "example_inputs"
    assert checked.cosine_report.checks["graphs checked"] >= 2  # the two addmm layers, traced on their own


def test_a_one_pass_iterator_of_calibration_batches_is_read_whole():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    batches = [torch.randn(4, 6) for _ in range(3)]
    converted = cosconvert.convert(model, calibration_data=iter(batches))
    assert converted.cosine_report.calibration["batches"] == 3


class Specializing(nn.Module):
    """A forward that differs under fx tracing (as code that checks for tracing does): the graph
    fx records is not what the module computes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if torch.fx._symbolic_trace.is_fx_tracing():
            return self.fc(x).relu()
        return self.fc(x).tanh()


def test_a_graph_that_disagrees_with_its_module_is_not_used():
    model = Specializing().eval()
    x = torch.randn(3, 6)
    converted = cosconvert.convert(model, gain="none", example_inputs=(x,))
    with torch.no_grad():
        out = converted(x)
    torch.testing.assert_close(out.double(), torch.tanh(linear_reference(x, model.fc.weight, model.fc.bias)))
    [fallback] = converted.cosine_report.fallbacks
    assert "other values" in fallback["reason"]


class Untraceable(nn.Module):
    """Data-dependent control flow around a layer child and a functional call on its own weight."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 4)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        h = self.head(torch.relu(self.body(x)))
        if h.sum() > -1e9:  # always true, but fx cannot know
            h = h * 1.0
        return F.linear(h, self.w)


def test_exclude_is_honoured_inside_a_fallback_and_the_report_says_what_ran():
    model = Untraceable().eval()
    x = torch.randn(2, 6)
    converted = cosconvert.convert(model, gain="none", exclude=["head"], example_inputs=(x,))
    with torch.no_grad():
        out = converted(x)
    h = torch.relu(linear_reference(x, model.body.weight, model.body.bias))
    h = F.linear(h, model.head.weight.double(), model.head.bias.double())  # excluded: a dot product
    torch.testing.assert_close(out.double(), linear_reference(h, model.w), rtol=1e-5, atol=1e-6)
    report = converted.cosine_report
    assert [row["name"] for row in report.skipped] == ["head"]
    assert sorted(row["name"] for row in report.converted) == ["<root>", "body"]  # <root>: F.linear on w


def test_pt2_program_strips_its_norms(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(1)
    ).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.data.normal_()
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    program, _ = load_model(tmp_path / "m.pt2")
    from_pt2 = cosconvert.convert(program, strip_norms="fold", gain="none")
    from_module = cosconvert.convert(model, strip_norms="fold", gain="none")
    assert len(from_pt2.cosine_report.stripped) == 2
    with torch.no_grad():
        torch.testing.assert_close(from_pt2(x), from_module(x), rtol=1e-4, atol=1e-5)
        kept = cosconvert.convert(program, gain="none")(x)
    assert (kept - from_pt2(x)).abs().max() > 1e-2  # stripping changed the function


def test_a_layer_run_by_fallback_has_a_gain_per_output_unit():
    model = nn.Sequential(DynamicSame(3, 6, 3, stride=2)).eval()
    converted = cosconvert.convert(model, gain="channel")
    layer = converted.get_submodule("0")
    assert layer.cosine_gain.shape == (6,) and converted.cosine_report.fallbacks[0]["name"] == "0"
    x, bias = torch.randn(2, 3, 7, 8), model[0].bias.view(1, -1, 1, 1)
    with torch.no_grad():
        before = converted(x) - bias
        layer.cosine_gain.copy_(torch.arange(1.0, 7.0))
        after = converted(x) - bias
    torch.testing.assert_close(after, before * torch.arange(1.0, 7.0).view(1, -1, 1, 1))


class _IteratedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = torch.relu(self.conv(x)) + x
        return F.linear(y.movedim(1, -1), self.mix).movedim(-1, 1)  # a functional call of the block's own


class _IteratesItsBlocks(nn.Module):
    """Falls back (an optional input) and iterates its Sequential in Python, as timm's naflexvit does."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_IteratedBlock(), _IteratedBlock())
        self.head = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def test_a_fallback_that_iterates_a_traced_container_keeps_its_blocks():
    """Grafting the container's graph back used to put fx's bare ``nn.Module()`` holders in place of
    its blocks, which then had no forward; the blocks stay themselves, and every call is a cosine."""
    torch.manual_seed(0)
    converted = assert_faithful(_IteratesItsBlocks().eval(), torch.randn(2, 4, 6, 6))
    assert type(converted.blocks[0]).__name__ == "_IteratedBlock"


@pytest.mark.parametrize(
    "layer, shape",
    [(nn.Linear(8, 4), (0, 8)), (nn.Conv1d(3, 4, 3), (0, 3, 9)), (nn.Conv2d(3, 4, 3), (0, 3, 8, 8)),
     (nn.Conv3d(2, 4, 3), (0, 2, 5, 5, 5))],
)  # fmt: skip
@pytest.mark.parametrize("centered", [False, True])
def test_an_empty_batch_gives_an_empty_output(layer, shape, centered):
    converted = cosconvert.convert(nn.Sequential(layer), centered=centered)
    with torch.no_grad():
        out, ref = converted(torch.zeros(shape)), layer(torch.zeros(shape))
    assert out.shape == ref.shape
