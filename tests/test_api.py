"""Public API paths: report_of, calibrate(max_batches=), convert(example_inputs=), export_onnx(opset=),
validate(rtol=, atol=), the printed report, "same" padding through export, and finetune's options."""

import copy
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from broken import spoil_cosine_conv
from reference import cosine_reference
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import cosconvert
from cosconvert.finetuning import finetune


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.ConvTranspose2d(4, 4, 1), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).eval()  # fmt: skip


def test_report_of_returns_the_report_and_refuses_a_model_convert_did_not_make():
    model = small_cnn()
    converted = cosconvert.convert(model, strip_norms="drop")
    report = cosconvert.report_of(converted)
    assert isinstance(report, cosconvert.ConversionReport)
    assert [r["name"] for r in report.converted] == ["0", "5"] and [r["name"] for r in report.stripped] == ["1"]
    assert cosconvert.report_of(copy.deepcopy(converted)).to_dict() == report.to_dict()  # survives a copy
    with pytest.raises(ValueError, match="not made by cosconvert.convert"):
        cosconvert.report_of(model)


def test_printed_report_lists_every_row_under_its_section(capsys):
    converted = cosconvert.convert(small_cnn(), strip_norms="fold")
    report = cosconvert.report_of(converted)
    print(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "converted 2 layers (2 module), skipped 1, stripped 1 normalizers, 0 fallbacks"

    def section(title: str, columns: list[str]) -> list[list[str]]:
        """The rows printed under ``title:``, cut at the columns of its rule line; a wrapped cell's
        continuation lines (first column empty) joined back on."""
        start = lines.index(f"{title}:")
        assert lines[start + 1].split() == columns
        starts = [m.start() for m in re.finditer(r"-+", lines[start + 2])]
        assert len(starts) == len(columns) and set(lines[start + 2].replace(" ", "")) == {"-"}
        rows = []
        for line in lines[start + 3 :]:
            if not line.strip():
                break
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
            if cells[0]:
                rows.append(cells)
            else:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells)]
        return rows

    assert section("converted", ["name", "kind", "source", "target"]) == [
        ["0", "module", "Conv2d", "CosineConv2d"], ["5", "module", "Linear", "CosineLinear"]
    ]  # fmt: skip
    reason = report.skipped[0]["reason"]
    assert section("skipped", ["name", "type", "reason"]) == [["3", "ConvTranspose2d", reason]]
    assert reason.startswith("transposed convolution")
    assert section("stripped", ["name", "type", "action"]) == [["1", "BatchNorm2d", "folded into 0"]]
    params = report.parameters
    assert f"parameters: {params['original']:,} -> {params['converted']:,}" in lines
    assert params["converted"] == params["original"] - 2 * 4 + 4 + 5  # BN's affine gone; a gain per unit


class _Counting:
    """An iterable of batches that counts how many were taken from it."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


def test_calibrate_max_batches_takes_only_that_many():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    batches = [torch.randn(16, 6) * (i + 1) for i in range(5)]
    data = _Counting(batches)
    limited = cosconvert.convert(model)
    result = cosconvert.calibrate(limited, model, data, max_batches=2)
    assert data.taken == 2 and result["batches"] == 2
    on_two, on_three = cosconvert.convert(model), cosconvert.convert(model)
    cosconvert.calibrate(on_two, model, batches[:2])
    cosconvert.calibrate(on_three, model, batches[:3])
    fitted = limited.state_dict()
    assert all(torch.equal(fitted[k], v) for k, v in on_two.state_dict().items())
    assert not all(torch.equal(fitted[k], v) for k, v in on_three.state_dict().items())


@pytest.mark.parametrize("batched", [True, False])
def test_calibration_fits_each_unit_by_least_squares(batched):
    """Against numpy's own line fit per output channel, on a batch large enough to be summed in
    several chunks, and on an unbatched (C, H, W) input, whose channels are axis 0."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval()
    x = torch.randn(20, 3, 128, 128) + 0.5  # 8 x 128 x 128 outputs a sample: 8 samples a chunk
    x = x if batched else x[0]
    converted = cosconvert.convert(original)
    with torch.no_grad():  # the cosine before any gain and bias, and the original's output
        w = original[0].weight.double()
        cos = cosine_reference(x.double() if batched else x.double()[None], w, padding=1)
        y = F.conv2d(x.double(), w, original[0].bias.double(), padding=1)
    cos = cos.movedim(1, -1).reshape(-1, 8).numpy() if batched else cos[0].reshape(8, -1).T.numpy()
    y = y.movedim(1, -1).reshape(-1, 8).numpy() if batched else y.reshape(8, -1).T.numpy()
    fits = np.array([np.polyfit(cos[:, j], y[:, j], 1) for j in range(8)])  # (slope, intercept) per unit
    cosconvert.calibrate(converted, original, [x])
    layer = next(m for m in converted.modules() if isinstance(m, cosconvert.nn.CosineConv2d))
    np.testing.assert_allclose(layer.gain.detach().double().numpy().ravel(), fits[:, 0], rtol=1e-4)
    np.testing.assert_allclose(layer.bias.detach().double().numpy(), fits[:, 1], rtol=1e-4, atol=1e-6)


class _ShapeByLayerType(nn.Module):
    """Untraceable (so converted by fallback), and its output shape depends on its layer's type."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > -1e9 and type(self.fc) is not nn.Linear:
            return y[:, :2]
        return y


def test_convert_example_inputs_checks_the_output_shapes():
    x = torch.randn(2, 4)
    converted = cosconvert.convert(nn.Sequential(nn.Linear(4, 3)), example_inputs=(x,))
    assert converted(x).shape == (2, 3)
    with pytest.raises(RuntimeError, match=r"differ in shape.*\[torch.Size\(\[2, 3\]\)\]"):
        cosconvert.convert(_ShapeByLayerType(), example_inputs=(x,))
    cosconvert.convert(_ShapeByLayerType())  # without example inputs nothing is run, nothing raised


def _session_output(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return out


def test_export_onnx_writes_the_opset_asked(tmp_path):
    opset = 21  # not the exporter's own default (20 with this torch)
    model = cosconvert.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))).eval()
    path = cosconvert.export_onnx(model, torch.randn(1, 3, 6, 6), tmp_path / "m.onnx", opset=opset)
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    for function in proto.functions:  # the cosine ops' bodies are written in the same opset
        assert {o.domain: o.version for o in function.opset_import}[""] == opset
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        np.testing.assert_allclose(_session_output(path, x), model(x).numpy(), atol=1e-5, rtol=0)


def test_validate_uses_the_tolerance_given(tmp_path):
    """A real file of a model whose bias differs by 3e-6 from the PyTorch model's passes the default
    tolerance and fails a strict one; a broken file fails the default and passes a loose one."""
    model = cosconvert.convert(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))).eval()
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.get_submodule("3").bias += 3e-6
    path = cosconvert.export_onnx(shifted, torch.randn(1, 4, 8), tmp_path / "m.onnx")
    check = lambda file, **tol: cosconvert.validate(file, model, [torch.randn(3, 4, 8)],  # noqa: E731
                                                    providers="CPUExecutionProvider", repeat=1, **tol)  # fmt: skip
    default = check(path)
    assert default.passed and 2e-6 < default.results[0].max_abs_error < 4e-6
    strict = check(path, rtol=1e-7, atol=1e-7)
    assert strict.tolerance == {"rtol": 1e-7, "atol": 1e-7} and not strict.passed
    spoil_cosine_conv(path, tmp_path / "broken.onnx")
    assert not check(tmp_path / "broken.onnx").passed
    assert check(tmp_path / "broken.onnx", rtol=10.0, atol=10.0).passed


@pytest.mark.slow
@pytest.mark.parametrize("centered", [False, True], ids=["cosine", "centered"])
def test_same_padding_with_even_kernels_through_export(tmp_path, centered):
    """An even kernel pads one pixel more after than before: the ONNX file on onnxruntime matches the
    float64 reference, gains included."""
    conv = nn.Conv2d(3, 4, (4, 2), padding="same", dilation=(1, 3))  # pads (1, 2) rows and (1, 2) columns
    model = cosconvert.convert(nn.Sequential(conv), centered=centered).eval()
    layer = model.get_submodule("0")
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 7, 8)
    path = cosconvert.export_onnx(model, x[:1], tmp_path / "same.onnx")
    ref = cosine_reference(x, conv.weight, conv.bias, padding="same", dilation=(1, 3), centered=centered,
                           gain=layer.gain).detach()  # fmt: skip
    assert ref.shape == (2, 4, 7, 8)
    np.testing.assert_allclose(_session_output(path, x), ref.numpy(), atol=2e-5, rtol=0)


# -- finetune ---------------------------------------------------------------------------------------


def _one_sgd_step(model: nn.Module, x, y, loss_fn, lr: float, weight_decay: float = 1e-4) -> dict:
    """The weights after one step of SGD with momentum (its first step: no history yet), gradient norm
    clipped to 1, written out by hand."""
    model = copy.deepcopy(model)
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    scale = min(1.0, 1.0 / (torch.cat([g.flatten() for g in grads]).norm().item() + 1e-6))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * (g * scale + weight_decay * p)
    return model.state_dict()


@pytest.mark.parametrize("loss", ["default", "user"])
def test_finetune_sgd_one_step_matches_the_hand_written_step(loss):
    """optimizer="sgd" takes an SGD step (an AdamW step would move every weight by about lr); a user
    ``loss_fn`` is the loss it descends, called once a step."""
    x = torch.randn(32, 4)
    model = nn.Linear(4, 3)
    calls = []
    if loss == "user":  # regression targets, an L1 loss
        y = torch.randn(32, 3)

        def loss_fn(out, target):
            calls.append(out.shape)
            return (out - target).abs().mean()
    else:
        y, loss_fn = torch.randint(0, 3, (32,)), None
    expected = _one_sgd_step(model, x, y, loss_fn or F.cross_entropy, lr=0.05)
    calls.clear()
    finetune(model, TensorDataset(x, y), epochs=1, batch_size=32, optimizer="sgd", lr=0.05, loss_fn=loss_fn,
             progress=False)  # fmt: skip
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    assert calls == ([(32, 3)] if loss == "user" else [])


class _Stream(IterableDataset):
    """Labelled samples of a separable task, streamed, with no length; counts what it yields."""

    def __init__(self, n: int):
        self.n, self.yielded = n, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            x = torch.randn(2, generator=g)
            self.yielded += 1
            yield x, (x[0] > 0).long()


def test_finetune_on_an_iterable_dataset():
    stream = _Stream(64)
    model = nn.Linear(2, 2)
    log = finetune(model, stream, epochs=4, batch_size=16, lr=0.05, progress=False)
    assert len(log) == 4 and stream.yielded == 4 * 64
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.parametrize("shape", [(1,), (5, 2)], ids=["one output", "3-d output"])
def test_finetune_distils_non_class_outputs_with_mse(shape):
    """A teacher whose output is not class scores (one unit, or a sequence of vectors): the student is
    pulled onto it by MSE (KL on a single softmax unit would be zero, and teach nothing)."""
    x = torch.randn(64, *shape[:-1], 4) if len(shape) > 1 else torch.randn(64, 4)
    teacher = nn.Linear(4, shape[-1]).requires_grad_(False)
    student = nn.Linear(4, shape[-1])

    def gap() -> float:
        with torch.no_grad():
            return F.mse_loss(student(x), teacher(x)).item()

    before = gap()
    log = finetune(student, TensorDataset(x), teacher=teacher, epochs=30, batch_size=16, lr=0.05, weight_decay=0,
                   progress=False)  # fmt: skip
    assert gap() < before / 20
    assert log[0]["loss"] > log[-1]["loss"]


@pytest.mark.slow
def test_export_of_a_model_returning_a_cache_names_it_and_says_use_cache_false(tmp_path):
    """GPT2Model returns a DynamicCache by default (use_cache): the export refuses in one line that names
    the cache and says what to do."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2Model(config).eval()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert type(model(ids).past_key_values).__name__ == "DynamicCache"  # use_cache defaults to True
    converted = cosconvert.convert(model, example_inputs={"input_ids": ids})
    path = tmp_path / "gpt2.onnx"
    with pytest.raises(cosconvert.onnx.export.ExportError) as err:
        cosconvert.export_onnx(converted, {"input_ids": ids}, path)
    message = str(err.value)
    assert "\n" not in message and "DynamicCache" in message and re.search(r"use_cache\s*=\s*False", message)
    assert not path.exists()


def test_every_public_name_and_submodule_resolves_in_a_fresh_process():
    """The package imports its names on first use: each of __all__, and submodules as attributes."""
    import subprocess
    import sys

    code = (
        "import cosconvert\n"
        "for name in cosconvert.__all__:\n    getattr(cosconvert, name)\n"
        "assert callable(cosconvert.convert) and callable(cosconvert.finetune) and callable(cosconvert.freeze)\n"
        "print(cosconvert.errors.InputError.code, cosconvert.onnx.export_onnx.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["2", "export_onnx"], proc.stderr
