"""Faithful conversion of third-party models (issue 10), judged against an independent reference.

Each model is converted once with ``gain="none"`` and its normalizers kept, then run on two input
shapes or input combinations, and compared with :mod:`faithful_reference`: the original model in
float64 with every ``F.linear``/``F.convNd`` call and every linear ``addmm`` replaced by the cosine of
what that call receives. The converted model runs in float32, as a user runs it.

Agreement: for every floating output tensor, ``max |converted - reference| / max |reference|``
under ``REL_TOL`` (relative to the output's largest magnitude, which stays meaningful where single
outputs are near zero). A layer the report lists as skipped (with its reason) is left as a dot
product in the reference too, so an honest skip passes and is listed as "partial" in the status.

The original's state_dict must be unchanged, tensor for tensor.

With ``FAITHFUL_STATUS=<file>`` set, each test appends one JSON line (model, faithful, rel error,
layers converted/skipped/fallbacks, ONNX, failure) to that file: the status table's source.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback

import pytest
import timm
import torch
import torchvision
import transformers
from faithful_reference import reference_outputs
from torch import nn

import cosconvert
from cosconvert.errors import first_line

REL_TOL = 1e-4


# -- models ----------------------------------------------------------------------------------------


def images(*shapes):
    """Input sets ``((x,), {})`` of random images: shapes as (batch, height[, width])."""
    sets = []
    for batch, h, *w in shapes:
        sets.append(((torch.randn(batch, 3, h, w[0] if w else h),), {}))
    return sets


def timm_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# timm: name -> (extra create_model arguments, input sets)
TIMM = {
    "tf_efficientnet_b0": ({}, [(2, 33), (3, 48, 40)]),  # Conv2dSame: odd sizes pad asymmetrically
    "resnetv2_50x1_bit": ({}, [(2, 32), (3, 48)]),  # StdConv2d
    "nf_resnet26": ({}, [(2, 32), (3, 40)]),  # ScaledStdConv2d
    "nf_regnet_b0": ({}, [(2, 33), (3, 48)]),  # ScaledStdConv2dSame
    "efficientvit_m0": ({"img_size": 64}, [(2, 64), (3, 96)]),
    "convnext_atto": ({}, [(2, 32), (3, 64)]),
    "vit_tiny_patch16_224": ({"img_size": 64, "dynamic_img_size": True}, [(2, 64), (3, 48)]),
    "deit_tiny_patch16_224": ({"img_size": 48}, [(2, 48), (3, 48)]),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4, "depths": (1, 1, 2, 1)}, [(2, 64), (3, 64)]),
    "levit_128s": ({"img_size": 64}, [(2, 64), (3, 64)]),
    "mobilevit_xxs": ({}, [(2, 64), (3, 96)]),
    "regnetx_002": ({}, [(2, 32), (3, 48)]),
    "coat_lite_tiny": ({"img_size": 64}, [(2, 64), (3, 64)]),
    "ecaresnet26t": ({}, [(2, 32), (3, 48)]),
    "mobilenetv3_small_050": ({}, [(2, 32), (3, 48)]),
    "resnet18d": ({}, [(2, 32), (3, 48)]),
    "ghostnet_050": ({}, [(2, 32), (3, 48)]),
    "repvgg_a0": ({}, [(2, 32), (3, 48)]),
    "poolformer_s12": ({}, [(2, 32), (3, 48)]),
    "mixer_s16_224": ({"img_size": 64}, [(2, 64), (3, 64)]),
    "cait_xxs24_224": ({"img_size": 48, "depth": 4}, [(2, 48), (3, 48)]),
    "xcit_nano_12_p16_224": ({"img_size": 64, "depth": 4}, [(2, 64), (3, 48)]),
    "edgenext_xx_small": ({}, [(2, 64), (3, 96)]),
    "fastvit_t8": ({}, [(2, 64), (3, 96)]),
    "dla34": ({}, [(2, 32), (3, 64)]),  # its tree joins need sizes divisible by 32
    "gernet_s": ({}, [(2, 32), (3, 48)]),
    "pvt_v2_b0": ({}, [(2, 64), (3, 96)]),
    "tf_mixnet_s": ({}, [(2, 33), (3, 48)]),  # Conv2dSame in mixed kernel sizes
    "lcnet_050": ({}, [(2, 32), (3, 48)]),
}


def tokens(*shapes, vocab=100, mask=()):
    """Input sets ``((), kwargs)`` for text models: shapes (batch, length); indices in ``mask`` get an
    attention_mask with the last tokens of the first row padded."""
    sets = []
    for i, (batch, length) in enumerate(shapes):
        kwargs = {"input_ids": torch.randint(vocab, (batch, length))}
        if i in mask:
            m = torch.ones(batch, length, dtype=torch.long)
            m[0, length // 2 :] = 0
            kwargs["attention_mask"] = m
        sets.append(((), kwargs))
    return sets


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def hf_bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=100, **SMALL))


def hf_roberta():
    return transformers.RobertaModel(transformers.RobertaConfig(vocab_size=100, **SMALL))


def hf_distilbert():
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    return transformers.DistilBertModel(config)


def hf_gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4))


def hf_t5_encoder():
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(config)


def hf_vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, **SMALL)
    return transformers.ViTModel(config)


def hf_whisper_encoder():
    config = transformers.WhisperConfig(
        num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        max_source_positions=16, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
    )  # fmt: skip
    return transformers.WhisperModel(config).get_encoder()


# Issue 27's long tail: dot products that are no F.linear call of a module.
def hf_wavlm():  # calls F.multi_head_attention_forward with its q/k/v/out_proj weights
    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )  # fmt: skip
    return transformers.WavLMModel(config)


def hf_falcon():  # FalconLinear computes input @ self.weight.T
    config = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return transformers.FalconModel(config)


def hf_mamba():  # dt_proj.weight @ x
    config = transformers.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2)
    return transformers.MambaModel(config)


def hf_mixtral():  # fused experts: torch._grouped_mm
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralModel(config)


def hf_qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=8,
    )  # fmt: skip
    return transformers.Qwen3MoeModel(config)


def hf_swin():  # its probe at a small size shrinks window_size, which must not stick
    config = transformers.SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2])
    return transformers.SwinModel(config)


def hf_recurrent_gemma():  # its RG-LRU gates: products of an activation with a weight parameter
    config = transformers.RecurrentGemmaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, lru_width=32, attention_window_size=16, head_dim=8,
        block_types=["recurrent", "recurrent", "attention"],
    )  # fmt: skip
    return transformers.RecurrentGemmaModel(config)


def hf_mgpstr():  # a ViT over 32x128 text images with three heads
    config = transformers.MgpstrConfig(image_size=[32, 128], patch_size=4, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, mlp_ratio=2.0)  # fmt: skip
    return transformers.MgpstrForSceneTextRecognition(config)


def vit_images():
    x2, x3 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 48)
    return [((), {"pixel_values": x2}), ((), {"pixel_values": x3, "interpolate_pos_encoding": True})]


# transformers: name -> (builder, input sets)
HF = {
    "BertModel": (hf_bert, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "RobertaModel": (hf_roberta, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "DistilBertModel": (hf_distilbert, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "GPT2Model": (hf_gpt2, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "T5EncoderModel": (hf_t5_encoder, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "ViTModel": (hf_vit, vit_images),
    "WhisperEncoder": (
        hf_whisper_encoder,
        lambda: [((torch.randn(2, 8, 32),), {}), ((torch.randn(3, 8, 32),), {})],
    ),
    "WavLMModel": (hf_wavlm, lambda: [((torch.randn(2, 400),), {}), ((torch.randn(3, 600),), {})]),
    "FalconModel": (hf_falcon, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "MambaModel": (hf_mamba, lambda: tokens((2, 7), (3, 11))),
    "MixtralModel": (hf_mixtral, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "Qwen3MoeModel": (hf_qwen3_moe, lambda: tokens((2, 7), (3, 11), mask=(1,))),
    "SwinModel": (hf_swin, lambda: [((torch.randn(1, 3, 224, 224),), {})]),
    "RecurrentGemmaModel": (hf_recurrent_gemma, lambda: tokens((2, 9), (3, 11))),
    "MgpstrForSceneTextRecognition": (
        hf_mgpstr,
        lambda: [((torch.randn(2, 3, 32, 128),), {}), ((torch.randn(3, 3, 32, 128),), {})],
    ),
}

# torchvision: name -> (extra get_model arguments, input sets)
TORCHVISION = {
    "resnet18": ({}, [(2, 32), (3, 48)]),
    "mobilenet_v3_small": ({}, [(2, 32), (3, 48)]),
    "efficientnet_b0": ({}, [(2, 32), (3, 48)]),
    "convnext_tiny": ({}, [(2, 32), (3, 48)]),
    "vit_b_16": ({"image_size": 64}, [(2, 64), (3, 64)]),
    "swin_t": ({}, [(2, 64), (3, 96)]),
    "regnet_y_400mf": ({}, [(2, 32), (3, 48)]),
}


@torch.no_grad()
def liven(model: nn.Module) -> nn.Module:
    """Randomize what random init leaves constant or tiny, so that no layer hides from the comparison:
    zero-initialized heads, 1e-6 layer scales, unit norm weights, zero biases, fresh running stats."""
    for name, p in model.named_parameters():
        if p.numel() > 1 and (p.std() == 0 or p.abs().max() < 1e-3):
            if p.dim() == 1 and not name.endswith("bias"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    for name, b in model.named_buffers():
        if name.endswith("running_var"):
            b.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            b.normal_(0, 0.1)
    return model


def case(family: str, name: str):
    """(model in eval mode, input sets) for one case, built from a fixed seed."""
    torch.manual_seed(0)
    if family == "timm":
        kwargs, shapes = TIMM[name]
        model, inputs = timm_model(name, **kwargs), images(*shapes)
    elif family == "transformers":
        build, make_inputs = HF[name]
        model, inputs = build(), make_inputs()
    else:
        kwargs, shapes = TORCHVISION[name]
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
        inputs = images(*shapes)
    return liven(model).eval(), inputs


CASES = [("timm", n) for n in TIMM] + [("transformers", n) for n in HF] + [("torchvision", n) for n in TORCHVISION]


# -- comparison ------------------------------------------------------------------------------------


def leaves(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in leaves(o)]
    return [out] if isinstance(out, torch.Tensor) and out.is_floating_point() else []


def rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| over every output tensor."""
    outs, refs = leaves(out), leaves(ref)
    assert [t.shape for t in outs] == [t.shape for t in refs], "outputs differ in shape from the reference's"
    assert refs, "the model returned no floating tensor"
    return max(float((o.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for o, r in zip(outs, refs))


def skipped_modules(model: nn.Module, report) -> list[str]:
    """Names of the original's modules the report lists as skipped (left as dot products)."""
    names = {n for n, _ in model.named_modules()}
    rows = [row for row in report.skipped if row.get("reason")]
    return [row["name"] for row in rows if row["name"] in names]


def record(**row) -> None:
    path = os.environ.get("FAITHFUL_STATUS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def recording(kind: str, family: str, name: str):
    """A dict the test fills in, appended to the status file however the test ends."""
    row = {"kind": kind, "family": family, "model": name, "ok": False}
    try:
        yield row
    except BaseException as err:
        last = traceback.extract_tb(err.__traceback__)[-1]
        row["error"] = f"{first_line(err, with_type=True)} ({os.path.basename(last.filename)}:{last.lineno})"
        raise
    finally:
        record(**row)


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), CASES, ids=[n for _, n in CASES])
def test_faithful(family, name):
    with recording("faithful", family, name) as row:
        check_faithful(family, name, row)


def check_faithful(family: str, name: str, row: dict) -> None:
    model, input_sets = case(family, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = cosconvert.convert(model, gain="none").eval()
    report = converted.cosine_report
    skipped = skipped_modules(model, report)
    row.update(converted=len(report.converted), skipped=len(report.skipped), fallbacks=len(report.fallbacks))
    errors = []
    for args, kwargs in input_sets:
        ref, mode = reference_outputs(model, *args, skip=skipped, **kwargs)  # first: the input set is valid
        with torch.no_grad():
            out = converted(*args, **kwargs)
        assert sum(mode.calls.values()) > 0, "the reference replaced no layer call"
        assert max(r.abs().max() for r in leaves(ref)) > 1e-3, "degenerate reference output: it cannot judge"
        errors.append(rel_error(out, ref))
        row["rel"] = max(errors)
        row["weight_products"] = mode.weight_products[:3]
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), (
        "convert() changed the original's weights"
    )
    assert max(errors) < REL_TOL, f"rel error {max(errors):.2e} per input set {[f'{e:.1e}' for e in errors]}"
    row["faithful"] = "partial" if skipped else "yes"
    row["ok"] = True


# -- ONNX ------------------------------------------------------------------------------------------

# Conv2dSame, StdConv, a ViT, GPT-2 (Conv1D), BERT with dynamic batch and sequence length.
# (family, model, why it is known to fail, or None): a known failure is a strict xfail, so a fix shows up.
ONNX_CASES = [
    ("timm", "tf_efficientnet_b0", None),
    ("timm", "resnetv2_50x1_bit", None),
    ("timm", "vit_tiny_patch16_224", None),
    ("timm", "nf_resnet26", None),
    ("timm", "efficientvit_m0", None),
    ("transformers", "GPT2Model", None),
    ("transformers", "BertModel", None),
    ("transformers", "DistilBertModel", None),
]
# text models: the inputs to export, by name (GPT-2's mask is not its second positional parameter)
ONNX_INPUTS = {name: ("input_ids", "attention_mask") for name in ("GPT2Model", "BertModel", "DistilBertModel")}


def export_inputs(name: str, args: tuple, kwargs: dict) -> tuple | dict:
    """One input set as the export takes it: the positional images, or the text inputs by name,
    with an all-ones mask where the set has none (the same computation)."""
    if name not in ONNX_INPUTS:
        return args
    return {k: kwargs.get(k, torch.ones_like(kwargs["input_ids"])) for k in ONNX_INPUTS[name]}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "name"),
    [
        pytest.param(f, n, id=n, marks=[pytest.mark.xfail(strict=True, reason=why)] if why else [])
        for f, n, why in ONNX_CASES
    ],
)
def test_onnx_export_validates(family, name, tmp_path):
    """Export with a dynamic batch (and, for text, sequence length: the two input sets differ in both),
    validate on onnxruntime against the converted model, and compare with the reference too."""
    import onnxruntime as ort

    with recording("onnx", family, name) as row:
        model, input_sets = case(family, name)
        if family == "timm":  # one image size (ViT's export fixes it), two batch sizes
            input_sets = [((torch.randn(b, *input_sets[0][0][0].shape[1:]),), {}) for b in (2, 3)]
        batches = [export_inputs(name, args, kwargs) for args, kwargs in input_sets]
        if name == "GPT2Model":
            model.config.use_cache = False  # a cache object is no ONNX output: export features, as users do
        converted = cosconvert.convert(model, gain="none").eval()
        path = cosconvert.export_onnx(converted, batches[0], tmp_path / "model.onnx")
        report = cosconvert.validate(path, converted, inputs=batches, providers="CPUExecutionProvider")
        assert report.passed, " / ".join(str(report).splitlines()[-2:])  # the provider's verdict, the overall one
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        for (args, kwargs), batch in zip(input_sets, batches):
            feed = batch if isinstance(batch, dict) else dict(zip(names, batch))
            (out, *_) = session.run(None, {n: t.numpy() for n, t in feed.items()})
            ref = leaves(reference_outputs(model, *args, **kwargs)[0])[0]
            row["rel"] = max(row.get("rel", 0.0), rel_error(torch.from_numpy(out), ref))
        assert row["rel"] < REL_TOL, f"onnxruntime against the reference: rel error {row['rel']:.2e}"
        row["ok"] = True


@pytest.mark.slow
def test_onnx_zero_pad_then_maxpool_stays_exact_on_onnxruntime(tmp_path):
    """resnetv2's stem pattern: ConstantPad2d(0) then MaxPool, on a map with negative values. onnxruntime's
    PadFusion (at its default optimization level) would fold the pad into MaxPool's own padding, which is
    -inf, changing border windows; the export keeps the two apart."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, stride=2), nn.Flatten(),
                          nn.Linear(100, 5))  # fmt: skip
    converted = cosconvert.convert(model.eval(), gain="none").eval()
    path = cosconvert.export_onnx(converted, torch.randn(2, 3, 12, 12), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default: every fusion on
    x = torch.randn(3, 3, 12, 12)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert rel_error(out, reference_outputs(model, x)[0]) < REL_TOL


# -- the judge itself, on single layers (fast) ------------------------------------------------------


def test_reference_takes_the_operands_each_call_receives():
    """Against hand-built float64 cosines: a Conv2dSame's own asymmetric padding, a StdConv's
    standardized weight, a reflect-padded conv, a transformers Conv1D (addmm) and the projections
    inside nn.MultiheadAttention."""
    from reference import cosine_reference, linear_reference
    from timm.layers import Conv2dSame, StdConv2d
    from transformers.pytorch_utils import Conv1D

    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    same = Conv2dSame(3, 4, 4, stride=2).double()
    pads = [max((-(-n // 2) - 1) * 2 + 4 - n, 0) for n in (8, 9)]  # the 'same' total for width, height
    padded = nn.functional.pad(x, [pads[0] // 2, pads[0] - pads[0] // 2, pads[1] // 2, pads[1] - pads[1] // 2])
    expected = cosine_reference(padded, same.weight, same.bias, stride=2)
    assert torch.allclose(reference_outputs(same, x)[0], expected, rtol=0, atol=1e-12)

    std = StdConv2d(3, 4, 3, padding=1).double()
    centered = std.weight - std.weight.mean((1, 2, 3), keepdim=True)  # the scale is the cosine's to ignore
    out = reference_outputs(std, x)[0]
    assert torch.allclose(out, cosine_reference(x, centered, std.bias, padding=1), rtol=0, atol=1e-9)
    assert not torch.allclose(out, cosine_reference(x, std.weight, std.bias, padding=1), atol=1e-3)

    reflect = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    expected = cosine_reference(nn.functional.pad(x, [1, 1, 1, 1], mode="reflect"), reflect.weight, reflect.bias)
    assert torch.allclose(reference_outputs(reflect, x)[0], expected, rtol=0, atol=1e-12)

    tokens_ = torch.randn(2, 5, 8, dtype=torch.float64)
    conv1d = Conv1D(6, 8).double()
    out, mode = reference_outputs(conv1d, tokens_)
    assert mode.calls == {"addmm": 1}
    assert torch.allclose(out, linear_reference(tokens_, conv1d.weight.t(), conv1d.bias), rtol=0, atol=1e-12)

    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    out, mode = reference_outputs(mha, tokens_, tokens_, tokens_, need_weights=False)
    q, k, v = linear_reference(tokens_, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    heads = [t.view(2, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]
    mixed = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / 2, -1) @ heads[2]
    expected = linear_reference(mixed.transpose(1, 2).reshape(2, 5, 8), mha.out_proj.weight, mha.out_proj.bias)
    assert torch.allclose(out[0], expected, rtol=0, atol=1e-12)


def test_reference_leaves_skipped_modules_and_the_original_alone():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6)
    out, mode = reference_outputs(model, x, skip=["2"])
    assert mode.calls == {"linear": 1} and out.dtype == torch.float64
    hidden = torch.relu(torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(
        model[0].weight.double(), dim=1).t() + model[0].bias.double())  # fmt: skip
    assert torch.allclose(out, hidden @ model[2].weight.double().t() + model[2].bias.double(), atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32
