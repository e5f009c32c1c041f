"""Validation says what it can vouch for: fidelity to the original apart from ONNX parity, `inconclusive`
on outputs that cannot tell a right file from a wrong one, and tolerances that follow the model's conditioning."""

import copy
import hashlib
import json
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

import cosconvert

ZERO_HEAD_PY = """
from torch import nn


class ZeroHead(nn.Module):
    '''A classifier whose head starts at zero, as torchvision's vit_b_16 does: every output is 0.'''

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(x))
"""


def cosconvert_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cosconvert", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def test_zero_head_network_is_inconclusive_never_pass(tmp_path):
    """The whole CLI run on a zero-head network: exit 5, one line saying why, report.json says inconclusive.
    The ONNX file's metadata_props name cosconvert's version, the conversion settings and the source's SHA-256."""
    (tmp_path / "zero.py").write_text(ZERO_HEAD_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        from zero import ZeroHead
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(ZeroHead().state_dict(), tmp_path / "zero.pt")
    proc = cosconvert_cli("zero.pt", "--arch", "zero.py:ZeroHead", "--input-shape", "2,3,16,16", "--out-dir", "out",
                          "--centered", "--quiet", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "inconclusive" in lines[0] and "exactly 0" in lines[0], proc.stderr
    validation = json.loads((tmp_path / "out" / "report.json").read_text())["validation"]
    assert validation["status"] == "inconclusive" and not validation["passed"]
    assert "validation: inconclusive" in proc.stdout and "validation: pass" not in proc.stdout
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx")).metadata_props}
    assert meta["cosconvert_version"] == cosconvert.__version__
    assert json.loads(meta["conversion_settings"])["centered"] is True
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "zero.pt").read_bytes()).hexdigest()
    assert json.loads(meta["input_shape"]) == [2, 3, 16, 16]


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "case, words",
    [
        ("nan", "non-finite"),
        ("constant", "same value"),
        ("ignores input", "same output for different inputs"),
    ],
)
def test_degenerate_outputs_are_inconclusive(tmp_path, case, words):
    """Outputs that are NaN, constant, or blind to the input, from the original: never `pass`."""
    original = Classifier().eval()
    converted = cosconvert.convert(original)
    with torch.no_grad():
        last = original.body[2]
        if case == "nan":
            last.bias.fill_(float("nan"))
        elif case == "constant":
            last.weight.zero_()
            last.bias.fill_(0.5)
        else:  # a head that looks at nothing but its bias, a different value per class
            last.weight.zero_()
            last.bias.copy_(torch.arange(6.0))
    path = cosconvert.export_onnx(converted, torch.randn(2, 16), tmp_path / "m.onnx")
    report = cosconvert.validate(path, converted, [torch.randn(4, 16)], original=original)
    assert all(r.passed for r in report.results)  # the file itself matches the converted model...
    assert report.status == "inconclusive" and not report.passed  # ...but the original's outputs cannot vouch
    assert any(words in reason and "the original" in reason for reason in report.inconclusive), report.inconclusive


def test_fidelity_to_the_original_is_measured_apart_from_parity(tmp_path):
    """The report's fidelity is the converted model against the original, computed here independently."""
    original = Classifier().eval()
    converted = cosconvert.convert(original)
    x = torch.randn(8, 16)
    path = cosconvert.export_onnx(converted, x, tmp_path / "m.onnx")
    report = cosconvert.validate(path, converted, [x], original=original)
    with torch.no_grad():
        a, b = converted(x).double(), original(x).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).mean().item()
    assert report.fidelity["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert report.fidelity["top1_agreement"] == pytest.approx(
        100.0 * (a.argmax(1) == b.argmax(1)).double().mean().item()
    )
    assert report.fidelity["max_rel_error"] == pytest.approx(((a - b).abs().max() / b.abs().max()).item(), rel=1e-6)
    assert report.passed and report.results[0].cosine > 0.99999 > report.fidelity["cosine"]


def test_parity_tolerance_follows_the_models_own_float32_float64_spread(tmp_path):
    """A last layer with a gain of 1e4 whose bias cancels its typical output, as calibrated folds reach:
    PyTorch's float32 is itself 1e-3 off float64, so parity is judged at a multiple of that, reported."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    converted = cosconvert.convert(original)
    v = torch.randn(1, 16)
    x = v + 1e-4 * torch.randn(8, 16)
    last = converted.get_submodule("2")
    with torch.no_grad():
        typical = converted(v)[0] - last.bias
        last.gain.fill_(1e4)
        last.bias.copy_(-1e4 * typical)
        y32, y64 = converted(x).double(), copy.deepcopy(converted).double()(x.double())
    spread = ((y32 - y64).abs().max() / y64.abs().max()).item()
    assert spread > 1e-4
    path = cosconvert.export_onnx(converted, x, tmp_path / "m.onnx")
    report = cosconvert.validate(path, converted, [x])
    assert report.spread == pytest.approx(spread, rel=1e-6)
    assert report.parity_tolerance["rtol"] >= 2 * spread and report.tolerance["rtol"] == 1e-4
    assert report.results[0].max_rel_error > report.tolerance["rtol"]  # the plain tolerance would fail it
    assert report.passed, report


def test_python_calls_print_nothing_unless_asked(tmp_path, capfd):
    """export_onnx (torch.onnx's progress lines, its warnings), validate and finetune are silent by default."""
    from torch.utils.data import TensorDataset

    original = nn.Sequential(nn.Linear(16, 8), nn.GRU(8, 8, batch_first=True)).eval()  # a GRU warns on export
    model = Classifier().eval()
    converted = cosconvert.convert(model)
    capfd.readouterr()
    path = cosconvert.export_onnx(converted, torch.randn(1, 16), tmp_path / "m.onnx")
    cosconvert.validate(path, converted, original=model)
    cosconvert.finetune(converted, TensorDataset(torch.randn(32, 16)), teacher=model, epochs=1, batch_size=8)
    cosconvert.export_onnx(cosconvert.convert(original), torch.randn(1, 3, 16), tmp_path / "gru.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    cosconvert.export_onnx(converted, torch.randn(1, 16), tmp_path / "m.onnx", verbose=True)
    assert "torch.onnx" in "".join(capfd.readouterr())  # what verbose=True shows


def test_gpu_provider_probe_loads_in_the_installed_onnxruntime():
    """``providers="auto"`` keeps a GPU provider only if a probe file loads on it. A probe that this
    onnxruntime cannot read (onnx 1.23 writes IR 14; onnxruntime 1.31 reads up to 13) made every GPU
    provider look absent, so validation ran on the CPU alone. Loaded here on the CPU provider."""
    import numpy as np
    import onnxruntime as ort

    from cosconvert.onnx.validate import _probe_model

    session = ort.InferenceSession(_probe_model(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.array([-2.0], dtype=np.float32)})
    assert y.tolist() == [0.0]


def test_reference_is_computed_without_tf32():
    """On CUDA, PyTorch's convs default to TF32 (10 mantissa bits), which put mobilenet_v3_small's float32
    reference 1.5e-2 off onnxruntime's float32 on an H100 (docs/gpu_check.md). The reference turns TF32 off
    for its own forward and restores the user's settings after."""
    from cosconvert.onnx.validate import _torch_outputs

    seen = []

    class Spy(nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return super().forward(x)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _torch_outputs(Spy(3, 2), [torch.randn(1, 3).numpy()])
        assert seen == [(False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_each_provider_row_says_where_its_nodes_ran(tmp_path):
    """A provider's row counts the nodes onnxruntime ran on it, from its profiler: on the CPU all of
    the optimized graph's nodes (counted here from onnxruntime's own optimized file). Read as if
    the provider had been CUDA, the same profile puts every node elsewhere, named by op type, as a
    GPU run whose nodes fell back to the CPU would show."""
    import onnxruntime as ort

    from cosconvert.onnx.validate import _placement

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    converted = cosconvert.convert(model.eval())
    x = torch.randn(2, 3, 8, 8)
    path = cosconvert.export_onnx(converted, x, tmp_path / "m.onnx")
    report = cosconvert.validate(path, converted, [x], providers="CPUExecutionProvider")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath).graph.node
    assert report.results[0].nodes_on_provider == f"{len(optimized)}/{len(optimized)}"
    assert f"{len(optimized)}/{len(optimized)}" in str(report)

    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    as_if_cuda, _ = _placement(session.end_profiling(), "CUDAExecutionProvider")
    ops = {n.op_type for n in optimized}
    assert as_if_cuda.startswith(f"0/{len(optimized)} (CPU ") and all(f"CPU {op} " in as_if_cuda for op in ops)
