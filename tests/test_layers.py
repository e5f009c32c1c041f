"""The cosine layers against an independent float64 unfold reference."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cosine_reference, linear_reference
from torch import nn

from cosconvert import functional as CF
from cosconvert.freezing import freeze
from cosconvert.nn import CosineConv1d, CosineConv2d, CosineConv3d, CosineLinear, CosineMultiheadAttention

CONVS = {1: CF.cosine_conv1d, 2: CF.cosine_conv2d, 3: CF.cosine_conv3d}
MODULES = {1: (nn.Conv1d, CosineConv1d), 2: (nn.Conv2d, CosineConv2d), 3: (nn.Conv3d, CosineConv3d)}
TOL = 1e-5  # float32 against the float64 reference


@st.composite
def conv_settings(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    c_in = groups * (1 if depthwise else draw(st.integers(1, 3)))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(st.one_of(st.just("same"), st.just("valid"), st.integers(0, 2)))
    stride = 1 if padding == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    sizes = tuple(
        max(d * (k - 1) + 1, 1) + draw(st.integers(0, 4 if dims < 3 else 2)) for k, d in zip(kernel, dilation)
    )
    return dict(
        dims=dims,
        groups=groups,
        c_in=c_in,
        c_out=c_out,
        kernel=kernel,
        dilation=dilation,
        padding=padding,
        stride=stride,
        sizes=sizes,
        batch=draw(st.integers(1, 3)),
        # A centered field of 2 or 3 values is often near-constant: float32 sums cannot resolve it (see docs).
        centered=(c_in // groups) * math.prod(kernel) >= 4 and draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=150, deadline=None)
@given(conv_settings())
def test_functional_conv_matches_reference(s):
    torch.manual_seed(s["seed"])
    x = torch.randn(s["batch"], s["c_in"], *s["sizes"])
    w = torch.randn(s["c_out"], s["c_in"] // s["groups"], *s["kernel"])
    b = torch.randn(s["c_out"]) if s["bias"] else None
    args = (s["stride"], s["padding"], s["dilation"], s["groups"])
    out = CONVS[s["dims"]](x, w, b, *args, centered=s["centered"])
    ref = cosine_reference(x, w, b, *args, centered=s["centered"])
    assert out.shape == ref.shape == getattr(F, f"conv{s['dims']}d")(x, w, b, *args).shape
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=0)


@settings(max_examples=100, deadline=None)
@given(conv_settings(), st.sampled_from(["none", "scalar", "channel"]))
def test_module_matches_reference_with_padding_modes(s, gain):
    torch.manual_seed(s["seed"])
    plain_cls, cosine_cls = MODULES[s["dims"]]
    padding, mode = s["padding"], s["padding_mode"]
    if mode != "zeros" and isinstance(padding, int):  # torch's own limit: a pad no wider than the input
        padding = min(padding, min(s["sizes"]) - 1)
    plain = plain_cls(
        s["c_in"], s["c_out"], s["kernel"], s["stride"], padding, s["dilation"], s["groups"], s["bias"], mode
    )
    layer = cosine_cls.from_module(plain, centered=s["centered"], gain=gain)
    if layer.gain is not None:
        with torch.no_grad():
            layer.gain.uniform_(0.5, 2.0)
    x = torch.randn(s["batch"], s["c_in"], *s["sizes"])
    if mode != "zeros":  # the reference sees the field as the padding mode fills it
        xp = F.pad(x, plain._reversed_padding_repeated_twice, mode=mode)
        ref = cosine_reference(
            xp, plain.weight, plain.bias, s["stride"], 0, s["dilation"], s["groups"], s["centered"], gain=layer.gain
        )
    else:
        ref = cosine_reference(
            x,
            plain.weight,
            plain.bias,
            s["stride"],
            padding,
            s["dilation"],
            s["groups"],
            s["centered"],
            gain=layer.gain,
        )
    torch.testing.assert_close(layer(x).double(), ref.detach(), atol=TOL * 2, rtol=0)
    unbatched = layer(x[0])  # (C, *spatial), which torch's conv layers take as well
    torch.testing.assert_close(unbatched.double(), ref[0].detach(), atol=TOL * 2, rtol=0)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(4, 9), st.integers(1, 6), st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_linear_matches_reference(batch, n_in, n_out, centered, bias, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, 2, n_in)
    layer = CosineLinear(n_in, n_out, bias, centered=centered)
    ref = linear_reference(x, layer.weight, layer.bias, centered=centered)
    torch.testing.assert_close(layer(x).double(), ref.detach(), atol=TOL, rtol=0)


@pytest.mark.parametrize("centered", [False, True])
def test_gradcheck(centered):
    x = torch.randn(2, 4, 5, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.double, requires_grad=True)
    g = torch.rand(6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, g: CF.cosine_conv2d(x, w, None, 2, 1, 1, 2, centered=centered, gain=g), (x, w, g)
    )
    x1 = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
    w1 = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: CF.cosine_linear(x, w, centered=centered), (x1, w1))
    x3 = torch.randn(1, 2, 3, 4, 3, dtype=torch.double, requires_grad=True)
    w3 = torch.randn(2, 2, 2, 2, 2, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: CF.cosine_conv3d(x, w, padding="same", centered=centered), (x3, w3))


@settings(max_examples=60, deadline=None)
@given(conv_settings())
def test_float32_gradients_match_reference(s):
    """The float32 backward (cosconvert's own for the norm sums) against autograd through the float64 reference."""
    torch.manual_seed(s["seed"])
    x = torch.randn(s["batch"], s["c_in"], *s["sizes"])
    # The gradient of x / |x| is a difference of terms of size 1 / |x| that cancel: for a field of norm
    # 0.001 float32 keeps only 1e-3 of it absolutely. Values of at least 0.1 keep the comparison fair.
    x = (x.sign() * x.abs().clamp_min(0.1)).requires_grad_()
    w = torch.randn(s["c_out"], s["c_in"] // s["groups"], *s["kernel"], requires_grad=True)
    args = (s["stride"], s["padding"], s["dilation"], s["groups"])
    out = CONVS[s["dims"]](x, w, None, *args, centered=s["centered"])
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w), upstream)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = cosine_reference(x64, w64, None, *args, centered=s["centered"])
    expected = torch.autograd.grad(ref, (x64, w64), upstream.double())
    # A weight's gradient is (g - w_hat (w_hat . g)) / |w|, g the gradient for the unit weight w_hat: its
    # terms are of size |g| / |w| and may cancel (to exactly 0 for a one-element row), so that is its scale.
    norms = w64.detach().flatten(1).norm(dim=1).view(-1, *[1] * (w.dim() - 1))
    w_hat = (w64.detach() / norms).requires_grad_()
    (g,) = torch.autograd.grad(cosine_reference(x64, w_hat, None, *args), w_hat, upstream.double())
    terms = (g.flatten(1).norm(dim=1) / norms.flatten()).max().item()
    for got, want, scale in zip(grads, expected, (0.0, terms)):
        scale = max(scale, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=1e-4 * (1 + scale), rtol=1e-3)


@pytest.mark.parametrize("centered", [False, True])
def test_zero_and_constant_fields_are_finite_zero(centered):
    w = torch.randn(5, 3, 3, 3)
    for fill in [0.0, 7.5]:
        if fill and not centered:
            continue  # a constant field has a direction; only its centered form is zero
        x = torch.full((2, 3, 6, 6), fill, requires_grad=True)
        out = CF.cosine_conv2d(x, w, padding=1, centered=centered)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        inner = out[..., 1:-1, 1:-1]
        assert torch.equal(inner, torch.zeros_like(inner)), (fill, inner.abs().max())
        if fill == 0:
            assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(CF.cosine_linear(torch.zeros(2, 4), torch.randn(3, 4)), torch.zeros(2, 3))
    zero_weight = CF.cosine_linear(torch.randn(2, 4), torch.zeros(3, 4), centered=centered)
    assert torch.equal(zero_weight, torch.zeros(2, 3))


# Half types: the conv itself runs in fp16/bf16 (inputs rounded to 11 / 8 mantissa bits), norms in float32.
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("centered", [False, True])
def test_half_precision_agrees_with_float32(dtype, centered):
    x = torch.randn(2, 16, 12, 12) * 30  # big values: a half-precision sum of squares would lose them
    layer = CosineConv2d(16, 8, 3, padding=1, centered=centered)
    ref = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=HALF_TOL[dtype], rtol=0)
    lin = CosineLinear(64, 10, centered=centered)
    xl = torch.randn(4, 64) * 300
    torch.testing.assert_close(lin.to(dtype)(xl.to(dtype)).float(), lin.float()(xl), atol=HALF_TOL[dtype], rtol=0)


def test_autocast_bfloat16():
    layer = CosineConv2d(8, 8, 3, padding=1, centered=True)
    x = torch.randn(2, 8, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(x), atol=HALF_TOL[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_state_dict_loads_both_ways_and_from_module_shares_nothing(dims):
    plain_cls, cosine_cls = MODULES[dims]
    plain = plain_cls(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular")
    twin = cosine_cls.from_module(plain)
    assert twin.weight.data_ptr() != plain.weight.data_ptr()
    assert set(twin.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(twin.state_dict())
    gained = cosine_cls(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular", gain="channel")
    gained.load_state_dict(plain.state_dict())  # no gain in a plain state_dict: ones are kept
    assert torch.equal(gained.gain, torch.ones(6))
    assert "centered=False" in repr(twin) and "gain='channel'" in repr(gained)


def test_signatures_match_torch():
    import inspect

    for plain, cosine in [
        (nn.Linear, CosineLinear),
        *MODULES.values(),
        (nn.MultiheadAttention, CosineMultiheadAttention),
    ]:
        theirs = list(inspect.signature(plain.__init__).parameters)
        ours = list(inspect.signature(cosine.__init__).parameters)
        assert ours[: len(theirs)] == theirs and ours[len(theirs) :] == ["centered", "gain", "eps"], cosine


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_projections_are_cosine(batch_first):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    cos = CosineMultiheadAttention.from_module(mha, centered=True)
    q = torch.randn(3, 5, 8)
    out, weights = cos(q, q, q, need_weights=True)
    # Reference: the same attention with projections by the float64 reference.
    qq = q if batch_first else q.transpose(0, 1)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    proj = [linear_reference(qq, w[i * 8 : (i + 1) * 8], b[i * 8 : (i + 1) * 8], centered=True) for i in range(3)]
    n, length = qq.shape[:2]
    heads = [p.view(n, length, 2, 4).transpose(1, 2) for p in proj]
    att = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / 2.0, -1)
    mixed = (att @ heads[2]).transpose(1, 2).reshape(n, length, 8)
    ref = linear_reference(mixed, mha.out_proj.weight, mha.out_proj.bias, centered=True)
    ref = ref if batch_first else ref.transpose(0, 1)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.double(), att.mean(1).detach(), atol=1e-5, rtol=0)
    fast, _ = cos(q, q, q, need_weights=False)
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=0)


def _reference_attention(mha: nn.MultiheadAttention, twin: CosineMultiheadAttention, monkeypatch, *args, **kwargs):
    """``mha`` itself, in float64, with every projection (torch's own ``F.linear`` calls, packed or
    sliced) replaced by the float64 reference cosine with its rows of ``twin``'s gains."""
    ref = copy.deepcopy(mha).double().eval()
    gain = None if twin.gain is None else twin.gain.detach().double()
    out_gain = None if twin.out_proj.gain is None else twin.out_proj.gain.detach().double()
    separate = [ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight]

    def rows(w):
        if w is ref.out_proj.weight:
            return out_gain
        if ref._qkv_same_embed_dim:
            assert w.untyped_storage().data_ptr() == ref.in_proj_weight.untyped_storage().data_ptr()
            start = (w.storage_offset() - ref.in_proj_weight.storage_offset()) // w.shape[1]
        else:
            start = ref.embed_dim * next(i for i, p in enumerate(separate) if p is w)
        return gain if gain is None or gain.numel() == 1 else gain[start : start + w.shape[0]]

    def cosine_linear(x, w, b=None):
        return linear_reference(x, w, b, centered=twin.centered, gain=rows(w))

    monkeypatch.setattr(F, "linear", cosine_linear)  # torch's attention calls the module-level name
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        double = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        with torch.no_grad():
            return ref(*map(double, args), **{k: double(v) for k, v in kwargs.items()})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        monkeypatch.undo()


ATTENTION = {  # constructor kwargs, then (L, S, N) and the call's extra arguments
    "self, key padding": ({}, "self", {"key_padding_mask": "some"}),
    "cross, bool attn_mask": ({}, "cross", {"attn_mask": "bool"}),
    "float 3-d attn_mask and key padding": ({}, "cross", {"attn_mask": "float3d", "key_padding_mask": "float"}),
    "is_causal": ({}, "self", {"is_causal": True}),
    "unbatched, key padding": ({}, "unbatched", {"key_padding_mask": "some"}),
    "kdim vdim, centered": ({"kdim": 5, "vdim": 3, "centered": True}, "cross", {"key_padding_mask": "some"}),
}


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "sdpa"])
@pytest.mark.parametrize("gain", ["channel", "scalar"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_against_torch_with_cosine_projections(case, batch_first, gain, need_weights, monkeypatch):
    """Masks that mask, causal attention, unbatched input, separate kdim/vdim and gains other than one,
    frozen too, against torch's nn.MultiheadAttention with each projection a float64 reference cosine."""
    settings, shape, call = ATTENTION[case]
    settings = dict(settings)
    centered = settings.pop("centered", False)
    embed, heads, length, source, n = 8, 2, 4, 6 if shape == "cross" else 4, 3
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first, **settings).eval()
    twin = CosineMultiheadAttention.from_module(mha, centered=centered, gain=gain)
    with torch.no_grad():
        twin.gain.uniform_(0.5, 2.0)
        twin.out_proj.gain.uniform_(0.5, 2.0)
    lead = lambda steps: (steps,) if shape == "unbatched" else ((n, steps) if batch_first else (steps, n))  # noqa: E731
    q = torch.randn(*lead(length), embed)
    k = q if shape == "self" else torch.randn(*lead(source), mha.kdim)
    v = q if shape == "self" else torch.randn(*lead(source), mha.vdim)
    kwargs = {"need_weights": need_weights}
    if call.get("key_padding_mask"):
        mask = torch.rand(n, source) < 0.3
        mask[:, 0] = False  # every query keeps a key
        assert mask.any()
        if call["key_padding_mask"] == "float":  # additive
            mask = torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
        kwargs["key_padding_mask"] = mask[0] if shape == "unbatched" else mask
    if call.get("attn_mask") == "bool":
        mask = torch.rand(length, source) < 0.3
        mask[:, -1] = False
        kwargs["attn_mask"] = mask
    if call.get("attn_mask") == "float3d":
        kwargs["attn_mask"] = torch.randn(n * heads, length, source)
    causal = torch.ones(length, source, dtype=torch.bool).tril().logical_not()
    got, got_weights = twin(q, k, v, is_causal=call.get("is_causal", False), **kwargs)
    if call.get("is_causal"):  # torch wants the mask with the hint
        kwargs["attn_mask"], kwargs["is_causal"] = causal, True
    want, want_weights = _reference_attention(mha, twin, monkeypatch, q, k, v, **kwargs)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_weights.double(), want_weights, atol=1e-5, rtol=1e-5)
    if call.get("is_causal"):  # the mask given with the hint, and the hint alone, agree
        kwargs.pop("is_causal")
        torch.testing.assert_close(twin(q, k, v, **kwargs)[0], got, atol=1e-6, rtol=0)
        kwargs.pop("attn_mask")
    frozen = freeze(twin)
    assert frozen.prenormalized and frozen.gain is None
    with torch.no_grad():
        out = frozen(q, k, v, is_causal=call.get("is_causal", False), **kwargs)[0]
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_centered_norms_keep_float32_accuracy_under_a_large_mean(groups):
    """Fields of 100 +- 1 (std 1% of the RMS, above the constant-field cutoff): the textbook float32
    S2 - S1^2/n loses three digits; the shifted sums match a float64 unfold within float32 precision."""
    x = 100 + torch.randn(2, 4, 9, 9)
    inv = CF.receptive_field_inverse_norm(x, (3, 3), 1, 1, 1, groups, centered=True)
    fields = F.unfold(x.double(), 3, padding=1).view(2, groups, 4 // groups * 9, -1)
    expected = (fields - fields.mean(2, keepdim=True)).norm(dim=2).reciprocal().view(2, groups, 9, 9)
    torch.testing.assert_close(inv.double(), expected, rtol=1e-5, atol=0)
    naive = F.unfold(x, 3, padding=1).view(2, groups, 4 // groups * 9, -1)  # float32, the textbook way
    naive_inv = (naive.square().sum(2) - naive.sum(2).square() / naive.shape[2]).rsqrt().view_as(expected)
    assert ((naive_inv.double() - expected) / expected).abs().max() > 1e-4  # what the test guards against


def test_centered_linear_keeps_float32_accuracy_under_a_large_mean():
    x = 100 + torch.randn(5, 64)
    one_hot = torch.eye(3, 64)  # so the float32 numerator is exactly x[:, :3] and the output shows the norm
    out = CF.linear_normalized(x, one_hot, centered=True)
    inv = out.double() / x[:, :3].double()
    xc = x.double() - x.double().mean(1, keepdim=True)
    torch.testing.assert_close(inv, xc.norm(dim=1, keepdim=True).reciprocal().expand_as(inv), rtol=1e-5, atol=0)


def test_large_inputs_square_a_few_channels_at_a_time():
    """An input past the cache budget (4 MB) takes the chunked sum of squares: same result."""
    x = torch.randn(2, 160, 64, 64)  # 5.2 MB: squared in two pieces
    w1, w3 = torch.randn(8, 160, 1, 1), torch.randn(8, 160, 3, 3)
    torch.testing.assert_close(CF.cosine_conv2d(x, w1).double(), cosine_reference(x, w1), atol=TOL, rtol=0)
    torch.testing.assert_close(
        CF.cosine_conv2d(x, w3, padding=1).double(), cosine_reference(x, w3, padding=1), atol=TOL, rtol=0
    )


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("gain_shape", [None, (), (1,), (5,)])
def test_weight_normalization_gradients(centered, gain_shape):
    """normalize_weight's own backward: gradcheck in float64 (a constant row included), and float32
    against autograd through the plain formula g * w_c / max(|w_c|, eps), a zero row included."""
    w = torch.randn(5, 3, 2, 2, dtype=torch.double)
    w[3] = 0.7  # centered, a constant row: output and gradient 0
    g = None if gain_shape is None else torch.rand(gain_shape, dtype=torch.double) + 0.5
    fn = lambda w, g=None: CF.normalize_weight(w, centered=centered, gain=g)  # noqa: E731
    inputs = [w] if g is None else [w, g]
    assert torch.autograd.gradcheck(fn, [t.clone().requires_grad_() for t in inputs])

    def reference(w, g=None):
        w = w.flatten(1)
        w_c = w - w.mean(1, keepdim=True) if centered else w
        out = w_c / w_c.norm(dim=1, keepdim=True).clamp_min(1e-6)
        if centered:  # the documented rule: a row whose spread is under ~0.3% of its RMS counts as constant
            out = out * (w_c.square().sum(1, keepdim=True) > 1e-5 * w.square().sum(1, keepdim=True))
        return out if g is None else out * g.reshape(-1, 1)

    w[1] = 0.0  # a zero row: 0 out, and the eps clamp's gradient (not differentiable there for gradcheck)
    w[2] = 1e-8 * torch.randn(3, 2, 2)  # a row under eps: its norm is clamped, so it carries no norm gradient
    upstream = torch.randn(5, 12, dtype=torch.double)
    inputs64 = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*inputs64), inputs64, upstream)
    inputs32 = [t.float().requires_grad_() for t in inputs]
    got = torch.autograd.grad(fn(*inputs32).flatten(1), inputs32, upstream.float())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
