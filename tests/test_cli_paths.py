"""Command-line paths, each driven in real subprocesses on real files: the flags reach the converted model,
--json, --fp16/--inline, the guessed input shape, distillation end to end, batch-1 shapes (GRU), models that
fix their batch, --arch registry names, and an interrupted run resumed (exit 130, then --resume)."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from reference import cosine_reference
from torch import nn

import cosconvert
from cosconvert.load import LoadError, build_arch
from cosconvert.nn import CosineConv2d
from cosconvert.onnx.functions import DOMAIN

NET_PY = """
import torch
from torch import nn


class Net(nn.Module):
    '''A small digits CNN: (N, 1, 8, 8) -> 10 classes.'''

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(x))


class GRUNet(nn.Module):
    '''A sequence classifier with a GRU: (N, 5, 8) -> 4 classes.'''

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.gru(self.inp(x))
        return self.head(y[:, -1])


class FixedBatch(nn.Module):
    '''A model that only runs at batch 1 (it reshapes to a literal 1).'''

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.reshape(1, 8))
"""


def cosconvert_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cosconvert", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


def _nets(folder):
    spec = importlib.util.spec_from_file_location("nets", folder / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """nets.py and each net's random weights as a state_dict."""
    d = tmp_path_factory.mktemp("nets")
    (d / "nets.py").write_text(NET_PY)
    nets = _nets(d)
    torch.manual_seed(0)
    for name in ("Net", "GRUNet", "FixedBatch"):
        torch.save(getattr(nets, name)().state_dict(), d / f"{name}.pt")
    return d


@pytest.fixture(scope="module")
def full_run(folder):
    """The whole pipeline with conversion flags and distillation on digits (1 epoch), as --json."""
    args = ["Net.pt", "--arch", "nets.py:Net", "--data", "digits", "--epochs", "1", "--strip-norms", "drop",
            "--centered", "--gain", "scalar", "--include", "body.*", "--exclude", "body.3", "--json",
            "--out-dir", "full"]  # fmt: skip
    return cosconvert_cli(*args, cwd=folder), folder / "full"


def test_json_prints_the_report(full_run):
    proc, out = full_run
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((out / "report.json").read_text())


def test_conversion_flags_reach_the_converted_model(full_run, folder):
    """--include/--exclude choose the layers, --centered and --gain scalar shape them, --strip-norms drop removes
    the BatchNorm: checked on the restored model against the float64 unfold reference."""
    proc, out = full_run
    assert proc.returncode == 0, proc.stderr
    converted = cosconvert.restore(_nets(folder).Net().eval(), out / "converted.pt").eval()
    layers = dict(converted.named_modules())
    assert isinstance(layers["body.0"], CosineConv2d)
    assert type(layers["body.3"]) is nn.Conv2d and type(layers["head"]) is nn.Linear  # excluded, not included
    conv = layers["body.0"]
    assert conv.gain.numel() == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        got = conv(x)
    expected = cosine_reference(x, conv.weight, conv.bias, padding=1, centered=True, gain=conv.gain.reshape(-1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_distillation_through_the_full_run(full_run):
    """Distilled from the original on digits: the log, held-out agreement, fidelity and files are all reported."""
    proc, out = full_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert "by distillation" in proc.stderr
    (entry,) = summary["finetune"]
    assert entry["epoch"] == 1 and "teacher_agreement" in entry and "accuracy" in entry
    assert summary["accuracy_after"]["teacher_agreement"] == entry["teacher_agreement"]
    assert summary["evaluated_on"].startswith("digits test split")
    assert summary["validation"]["passed"] and summary["validation"]["fidelity"]["top1_agreement"] is not None
    assert "fidelity_before" in summary and "fidelity_after" in summary
    for name in ("checkpoints/last.pt", "checkpoints/curves.png", "converted.pt", "model.onnx", "report.json"):
        assert f"full/{name}" in summary["files"], summary["files"]


@pytest.fixture(scope="module")
def fp16_run(folder):
    """No --input-shape, no --data: the shape is guessed; exported in float16 with standard ops only."""
    return cosconvert_cli("Net.pt", "--arch", "nets.py:Net", "--fp16", "--inline", "--out-dir", "fp16", "--json",
                          cwd=folder), folder / "fp16"  # fmt: skip


def test_input_shape_guessed_from_the_first_layer(fp16_run):
    proc, _ = fp16_run
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["input_shape"] == [2, 1, 224, 224]  # Conv2d(1, ...): images, a batch of 2
    assert "random example inputs" in summary["evaluated_on"]


def test_fp16_and_inline_reach_the_file(fp16_run, full_run):
    proc, out = fp16_run
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not model.functions and all(n.domain != DOMAIN for n in model.graph.node)
    validation = json.loads(proc.stdout)["validation"]
    assert validation["dtype"] == "float16" and validation["passed"]
    plain = onnx.load(str(full_run[1] / "model.onnx"))  # without the flags: float32, cosconvert nodes
    assert plain.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(n.domain == DOMAIN for n in plain.graph.node) and plain.functions


@pytest.mark.slow
def test_gru_network_from_a_batch_1_shape(folder):
    """A GRU net given --input-shape 1,...: exported with a dynamic batch, validated at batches 1 and 8."""
    proc = cosconvert_cli("GRUNet.pt", "--arch", "nets.py:GRUNet", "--input-shape", "1,5,8", "--out-dir", "gru",
                          "--quiet", cwd=folder)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no exporter warnings or logs leak (a GRU export raises several)
    batch = onnx.load(str(folder / "gru" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    validation = json.loads((folder / "gru" / "report.json").read_text())["validation"]
    assert validation["passed"] and validation["batch_sizes"] == [1, 8]


@pytest.mark.slow
def test_a_model_that_fixes_its_batch_is_refused_then_exported_static(folder):
    common = ["FixedBatch.pt", "--arch", "nets.py:FixedBatch", "--input-shape", "1,8", "--quiet"]
    refused = cosconvert_cli(*common, "--out-dir", "fixed", cwd=folder)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "--static-batch" in lines[0], refused.stderr
    assert not (folder / "fixed" / "model.onnx").exists()  # never written with a silent static batch
    proc = cosconvert_cli(*common, "--static-batch", "--out-dir", "fixed", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert onnx.load(str(folder / "fixed" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_arch_registry_names():
    """timm:NAME, torchvision:NAME and transformers:CLASS (config fields from the kwargs) build those networks."""
    import timm
    import torchvision
    import transformers

    assert isinstance(build_arch("torchvision:resnet18", {"num_classes": 3}), torchvision.models.ResNet)
    assert build_arch("torchvision:resnet18", {"num_classes": 3}).fc.out_features == 3
    assert type(build_arch("timm:convnext_atto")) is type(timm.create_model("convnext_atto"))
    vit = build_arch("transformers:ViTForImageClassification",
                     {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                      "image_size": 16, "patch_size": 8, "num_labels": 3})  # fmt: skip
    assert isinstance(vit, transformers.ViTForImageClassification) and vit.config.hidden_size == 32
    assert vit.classifier.out_features == 3
    for spec, words in [("timm:no_such_net", "timm has no model"), ("torchvision:no_such_net", "no model"),
                        ("transformers:NoSuchClass", "not a transformers model class")]:  # fmt: skip
        with pytest.raises(LoadError, match=words):
            build_arch(spec)
    with pytest.raises(LoadError, match="no field"):
        build_arch("transformers:ViTForImageClassification", {"no_such_field": 1})


def test_transformers_config_is_built_from_the_kwargs():
    """Fields a config derives in its constructor follow the kwargs: Wav2Vec2's number of feature
    layers comes from the length of ``conv_dim``."""
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    model = build_arch("transformers:Wav2Vec2Model",
                       {**small, "conv_dim": [8, 8, 8], "conv_stride": [5, 2, 2], "conv_kernel": [10, 3, 3]})  # fmt: skip
    assert model.config.num_feat_extract_layers == 3 and len(model.feature_extractor.conv_layers) == 3
    assert model(torch.randn(1, 400)).last_hidden_state.shape[-1] == 32


@pytest.mark.slow
def test_timm_convnext_state_dict_end_to_end(tmp_path):
    """A timm ConvNeXt state_dict, --arch timm:convnext_atto, the default (guessed) input: converted, exported
    with a dynamic batch and validated."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "convnext.pt")
    proc = cosconvert_cli("convnext.pt", "--arch", "timm:convnext_atto", "--out-dir", "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["input_shape"] == [2, 3, 224, 224] and summary["validation"]["passed"]
    assert len(summary["conversion"]["converted"]) > 20


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default action. A shell starts background jobs with
    SIGINT ignored, and an ignored signal stays ignored across exec, so Python in the child would
    never raise KeyboardInterrupt (the cause of this test's failures when the suite ran in the background)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_first_epoch(args: list[str], cwd: Path, log_path: Path) -> tuple[int, str, str]:
    """Start the run, send SIGINT as soon as its first epoch's log appears: (exit code, stderr, what the
    test saw when it sent the signal)."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)  # fmt: skip
    while not log_path.exists() and proc.poll() is None:
        time.sleep(0.02)
    ended = proc.poll() is not None
    seen = f"log {'present' if log_path.exists() else 'absent'}, run {'ended' if ended else 'running'}"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    return proc.returncode, stderr, seen


@pytest.mark.slow
def test_interrupted_run_exits_130_and_resumes_from_its_checkpoint(folder):
    """SIGINT after the first epoch's checkpoint: exit 130 and one line; --resume then starts where the checkpoint
    left off (the log keeps the first epoch's entry as it was, and says where it resumed) and finishes.
    Runs that ended with exit 0 (fresh-check, in the background) had SIGINT ignored, inherited from the shell:
    see _default_sigint."""
    EPOCHS = 6
    out = "resume"
    args = [sys.executable, "-m", "cosconvert", "Net.pt", "--arch", "nets.py:Net", "--data", "digits",
            "--epochs", str(EPOCHS), "--batch-size", "16", "--out-dir", out, "--quiet"]  # fmt: skip
    log_path = folder / out / "checkpoints" / "log.json"
    code, stderr, seen = _interrupt_after_first_epoch(args, folder, log_path)
    assert code == 130, f"exit {code} ({seen}): {stderr.strip()[-300:]!r}"
    assert stderr.strip().splitlines() == ["cosconvert: interrupted; rerun with --resume to continue fine-tuning"]
    before = json.loads(log_path.read_text())
    assert len(before) < EPOCHS
    resumed = subprocess.run([*args, "--resume"], cwd=folder, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    log = json.loads((folder / out / "report.json").read_text())["finetune"]
    assert [e["epoch"] for e in log] == list(range(1, EPOCHS + 1))
    assert log[: len(before)] == before  # the epochs before the interrupt were not trained again
    assert "resumed_at_step" in log[len(before)] and all("resumed_at_step" not in e for e in log[len(before) + 1 :])


def test_inspect_prints_whole_reasons_wrapped(folder):
    """A skip reason longer than the table's 60-character column is wrapped onto the next line, never cut."""
    proc = cosconvert_cli("inspect", "GRUNet.pt", "--arch", "nets.py:GRUNet", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    (skipped,) = cosconvert.inspect(_nets(folder).GRUNet()).skipped
    assert len(skipped["reason"]) > 60
    assert " ".join(skipped["reason"].split()) in " ".join(proc.stdout.split())
    assert max(len(line) for line in proc.stdout.splitlines() if "gru" in line.lower()) < 100


class _Mixed(torch.nn.Module):
    """A conv, then the dot products cosconvert leaves alone: a transposed conv, a GRU, a bilinear form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.gru = torch.nn.GRU(4, 8, batch_first=True)
        self.bil = torch.nn.Bilinear(8, 8, 5)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = self.up(self.conv(x)).mean((2, 3)).unsqueeze(1).repeat(1, 3, 1)
        out, _ = self.gru(h)
        return self.fc(self.bil(out[:, -1], out[:, -1]))


def test_pt2_program_layers_are_named_after_their_modules_and_unconverted_ones_listed(tmp_path):
    """A dynamic-batch .pt2 with a GRU: converted layers take their source module's name (the program's
    nn_module_stack), the transposed conv, GRU and bilinear form are listed as skipped, and the command
    line runs it end to end."""
    import cosconvert
    from cosconvert.load import load_model

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Mixed().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "mixed.pt2")
    module, example = load_model(tmp_path / "mixed.pt2")
    report = cosconvert.convert(module, example_inputs=example).cosine_report
    assert [r["name"] for r in report.converted] == ["conv.conv2d", "fc.linear"], report.converted
    assert {r["name"] for r in report.skipped} == {"up.conv_transpose2d", "gru.gru", "bil.bilinear"}, report.skipped
    proc = cosconvert_cli("mixed.pt2", "--out-dir", "out", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(summary["conversion"]["converted"]) == 2 and summary["validation"]["passed"]
