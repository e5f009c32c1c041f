"""The installed command line, driven in subprocesses, on real files."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from broken import spoil_cosine_conv

import cosconvert as cosconvert_api

SMALL = ["--input-shape", "1,3,64,64", "--arch-kwargs", '{"num_classes": 10}']


def cosconvert(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cosconvert", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real model files of every kind the CLI meets."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), d / "resnet18.pt")
    torch.save(model, d / "pickled.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 64, 64),)), d / "resnet18.pt2")
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), d / "scripted.pt")
    (d / "truncated.pt").write_bytes((d / "resnet18.pt").read_bytes()[:50_000])
    (d / "garbage.pt").write_bytes(b"not a model at all")
    (d / "text.pt").write_text("epoch,loss\n1,0.5\n2,0.25\n")  # a log saved under the wrong name
    return d


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = cosconvert("demo", "--out-dir", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "report.json").read_text())
    assert summary["validation"]["passed"]
    assert summary["accuracy_after"]["accuracy"] >= summary["accuracy_original"]["accuracy"] - 2.0
    assert (out / "model.onnx").exists() and (out / "converted.pt").exists()


def _check_run(proc, out):
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "report.json").read_text())
    assert summary["validation"]["passed"] and len(summary["conversion"]["converted"]) == 21
    assert {p.name for p in out.iterdir()} >= {"converted.pt", "model.onnx", "report.json"}
    return summary


def test_state_dict_with_arch(files, tmp_path):
    out = tmp_path / "out"
    proc = cosconvert(files / "resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--strip-norms", "fold",
                      "--out-dir", out)  # fmt: skip
    summary = _check_run(proc, out)
    assert len(summary["conversion"]["stripped"]) == 20
    assert "[1/4] loaded" in proc.stderr and "files written" in proc.stdout
    assert (files / "resnet18.pt").exists()  # the input is never touched


def test_default_out_dir_is_beside_the_input(files, tmp_path):
    model = tmp_path / "net.pt"
    model.write_bytes((files / "resnet18.pt").read_bytes())
    proc = cosconvert(model, "--arch", "torchvision.models:resnet18", *SMALL, "--quiet")
    _check_run(proc, tmp_path / "net-cosine")
    assert model.read_bytes() == (files / "resnet18.pt").read_bytes()


def test_export_program(files, tmp_path):
    out = tmp_path / "out"
    _check_run(cosconvert(files / "resnet18.pt2", "--out-dir", out, "--quiet"), out)


def test_pickled_module_needs_trust(files, tmp_path):
    out = tmp_path / "out"
    refused = cosconvert(files / "pickled.pt", "--out-dir", out)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not out.exists()
    _check_run(cosconvert(files / "pickled.pt", "--trust-pickle", "--input-shape", "1,3,64,64", "--out-dir", out), out)


def test_inspect_writes_nothing(files, tmp_path):
    proc = cosconvert("inspect", files / "resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--json",
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["converted"]) == 21
    assert list(tmp_path.iterdir()) == []


BAD = {
    "missing": (["missing.pt"], "not found"),
    "garbage": (["garbage.pt", "--arch", "torchvision.models:resnet18"], "not a PyTorch file"),
    "truncated": (["truncated.pt", "--arch", "torchvision.models:resnet18"], "corrupt or truncated"),
    "text file": (["text.pt", "--arch", "torchvision.models:resnet18"], "not a PyTorch file"),
    "torchscript": (["scripted.pt"], "TorchScript"),
    "pickle": (["pickled.pt"], "--trust-pickle"),
    "no arch": (["resnet18.pt"], "--arch"),
    "bad arch": (["resnet18.pt", "--arch", "torchvision.models:no_such_net"], "cannot be imported"),
    "arch form": (["resnet18.pt", "--arch", "resnet18"], "module:callable"),
    "weights don't fit": (["resnet18.pt", "--arch", "torchvision.models:resnet34"], "do not fit"),
    "bad shape": (
        [
            "resnet18.pt",
            "--arch",
            "torchvision.models:resnet18",
            "--arch-kwargs",
            '{"num_classes": 10}',
            "--input-shape",
            "1,7,64,64",
        ],
        "--input-shape",
    ),  # fmt: skip
    "shape syntax": (
        ["resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL[2:], "--input-shape", "1,3,x"],
        "--input-shape",
    ),
    "bad device": (
        ["resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--device", "nodevice"],
        "--device",
    ),
    "epochs without data": (
        ["resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--epochs", "2"],
        "--data",
    ),
    "bad data": (["resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--data", "nope.npz"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(files, tmp_path, case):
    args, words = BAD[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cosconvert(*args, "--out-dir", out, cwd=files)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosconvert: error:") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the output folder is left as it was


def test_unwritable_output_folder(files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = cosconvert(
        files / "resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--out-dir", blocker / "x"
    )
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "--out-dir" in proc.stderr


@pytest.mark.parametrize(
    "args, code",
    [(["missing.pt"], 2), (["text.pt", "--arch", "torchvision.models:resnet18"], 2),
     (["resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL, "--out-dir", "resnet18.pt/x"], 3)],
)  # fmt: skip
def test_debug_adds_the_traceback_and_keeps_the_exit_code(files, args, code):
    plain, debug = cosconvert(*args, cwd=files), cosconvert(*args, "--debug", cwd=files)
    assert plain.returncode == debug.returncode == code, (plain.stderr, debug.stderr)
    assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()  # the same one line, last


def test_version():
    proc = cosconvert("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cosconvert {cosconvert_api.__version__}"


def test_version_answers_without_loading_torch():
    code = (
        "import sys\nfrom cosconvert.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["cosconvert", cosconvert_api.__version__, "no", "torch"], proc.stderr


def test_help_has_examples():
    proc = cosconvert("--help")
    assert proc.returncode == 0 and "cosconvert demo" in proc.stdout and "--arch timm:convnext_atto" in proc.stdout


OWN_OPTIONS = {
    "inspect": ({"--arch", "--strip-norms", "--gain", "--json"}, {"--fp16", "--epochs", "--resume", "--out-dir"}),
    "convert": ({"--data", "--centered", "--out-dir", "--amp"}, {"--fp16", "--epochs", "--resume", "--providers"}),
    "finetune": ({"--epochs", "--resume", "--data", "--amp"}, {"--fp16", "--centered", "--providers"}),
    "export": ({"--fp16", "--inline", "--static-batch"}, {"--epochs", "--centered", "--data", "--amp"}),
    "validate": ({"--reference", "--model", "--providers"}, {"--fp16", "--epochs", "--centered", "--amp"}),
    "run": ({"--epochs", "--fp16", "--providers", "--centered"}, set()),
    "demo": ({"--epochs", "--centered", "--out-dir"}, {"--arch", "--fp16"}),
}


def _options(help_text: str) -> dict[str, str]:
    """Each option of a --help page, with its help text (its lines joined)."""
    options, current = {}, None
    for line in help_text.split("\n\n", 1)[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("--") or stripped.startswith("-h"):
            current = stripped.split()[0].rstrip(",")
            options[current] = " ".join(stripped.split("  ", 1)[1:])
        elif current and line.startswith(" " * 10):
            options[current] += " " + stripped
        else:
            current = None
    return options


@pytest.mark.parametrize("command", list(OWN_OPTIONS))
def test_each_subcommand_takes_only_its_own_options_each_with_help_and_default(command):
    mine, others = OWN_OPTIONS[command]
    proc = cosconvert(command, "--help")
    options = _options(proc.stdout)
    assert mine <= set(options) and not others & set(options), sorted(options)
    for option, text in options.items():
        if option not in ("-h", "--help", "--version"):
            assert len(text) > 20 and "(default: " in text, (option, text)
    if others:
        refused = cosconvert(command, "model.pt", sorted(others)[0])
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "unrecognized arguments" in lines[0], refused.stderr


NET_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))

    def forward(self, x):
        return self.body(x)
"""


def _load_net(folder, **kwargs):
    """A fresh Net from the net.py the test wrote into ``folder``, as the CLI's --arch builds it."""
    spec = importlib.util.spec_from_file_location("net", folder / "net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net(**kwargs)


def _sklearn_digits():
    """Digits straight from scikit-learn, scaled as the CLI's `digits` data is: (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(bunch.target)


@torch.no_grad()
def _accuracy(model, x, y):
    return round(100.0 * (model(x).argmax(1) == y).float().mean().item(), 2)


def _user_net(folder, width):
    """A user's net.py with its weights saved as safetensors; returns the net whose weights were saved."""
    from safetensors.torch import save_file

    (folder / "net.py").write_text(NET_PY)
    torch.manual_seed(0)
    net = _load_net(folder, width=width).eval()
    save_file(net.state_dict(), folder / "net.safetensors")
    return net


def test_own_file_arch_safetensors_and_step_by_step_subcommands(tmp_path):
    """A user's net.py:Net with safetensors weights, taken one subcommand at a time, fine-tuned on digits."""
    _user_net(tmp_path, width=12)
    common = ["--arch", "net.py:Net", "--arch-kwargs", '{"width": 12}', "--out-dir", "out", "--quiet"]
    data = ["--data", "digits", "--strip-norms", "fold"]
    steps = [
        ("convert", data),
        ("finetune", ["--data", "digits", "--epochs", "2", "--no-distill", "--lr", "0.01", "--amp", "bf16"]),
    ]
    for command, extra in steps:
        proc = cosconvert(command, "net.safetensors", *common, *extra, cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
    out = tmp_path / "out"
    summary = json.loads((out / "report.json").read_text())  # the finetune step's
    assert summary["input_shape"] == [2, 1, 8, 8]  # from the data, with a batch of 2
    written = {str(p.relative_to(tmp_path)) for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.is_file()}
    assert set(summary["files"]) == written and "out/report.json" in written  # every file, report.json included
    # accuracy is measured on digits' held-out test split (every 4th sample), never on what was trained on
    assert summary["evaluated_on"].startswith("digits test split")
    converted = cosconvert_api.restore(_load_net(tmp_path, width=12), out / "converted.pt").eval()
    x, y = _sklearn_digits()
    held_out_accuracy = _accuracy(converted, x[::4], y[::4])
    assert summary["accuracy_after"]["accuracy"] == held_out_accuracy  # of the saved model
    proc = cosconvert("export", "net.safetensors", *common, "--input-shape", "2,1,8,8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cosconvert("validate", "out/model.onnx", "--quiet", cwd=tmp_path)  # the source named in the file
    assert proc.returncode == 0, proc.stderr
    validation = json.loads((out / "report.json").read_text())["validation"]
    assert validation["passed"] and validation["path"] == "out/model.onnx"
    log = json.loads((out / "checkpoints" / "log.json").read_text())
    assert log[-1]["accuracy"] == held_out_accuracy  # fine-tuning's own per-epoch figure
    assert log[-1]["amp"] == "bf16"  # --amp reached finetune, on the CPU too
    assert {"converted.pt", "model.onnx", "report.json", "checkpoints"} <= {p.name for p in out.iterdir()}
    # trained with labels on digits: a one-conv net learns slowly, but above chance (10 %) and downhill
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"] and log[-1]["accuracy"] > 15
    assert (out / "checkpoints" / "curves.png").stat().st_size > 1000


def test_accuracy_on_npz_is_measured_on_held_out_samples(tmp_path):
    """With a user's .npz, every 10th sample is held out of calibration and measured on, and the report says so."""
    net = _user_net(tmp_path, width=6)
    x, y = _sklearn_digits()
    x, y = x[:200], y[:200]
    np.savez(tmp_path / "mine.npz", x=x.numpy(), y=y.numpy())
    proc = cosconvert("convert", "net.safetensors", "--arch", "net.py:Net", "--arch-kwargs", '{"width": 6}',
                      "--data", "mine.npz", "--out-dir", "out", "--quiet", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "every 10th sample of mine.npz" in summary["evaluated_on"] and "(20 samples)" in summary["evaluated_on"]
    assert summary["accuracy_original"]["accuracy"] == _accuracy(net, x[::10], y[::10])
    converted = cosconvert_api.restore(_load_net(tmp_path, width=6), tmp_path / "out" / "converted.pt").eval()
    assert summary["accuracy_before"]["accuracy"] == _accuracy(converted, x[::10], y[::10])


def test_validate_fails_on_a_wrong_onnx_file(tmp_path):
    """`cosconvert validate` on a file whose CosineConv body was edited: exit 1, one line on stderr."""
    _user_net(tmp_path, width=6)
    common = ["net.safetensors", "--arch", "net.py:Net", "--arch-kwargs", '{"width": 6}', "--input-shape", "1,1,8,8",
              "--out-dir", "out", "--quiet"]  # fmt: skip
    for command in ("convert", "export"):
        assert cosconvert(command, *common, cwd=tmp_path).returncode == 0
    onnx_path = tmp_path / "out" / "model.onnx"
    spoil_cosine_conv(onnx_path, onnx_path)
    proc = cosconvert("validate", "out/model.onnx", "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosconvert: error:") and "tolerance" in lines[0], proc.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not summary["validation"]["passed"]


def test_a_folder_of_unlabeled_images_reconstructs_and_reports_every_stage(files, tmp_path):
    """`cosconvert MODEL --data DIR --reconstruct` on a flat folder of photos (crops of scikit-learn's
    sample photos): the summary and report.json give fidelity at each stage, in order."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        image = load_sample_images().images[i % 2]
        y, x = rng.integers(0, 200), rng.integers(0, 300)
        Image.fromarray(image[y : y + 160, x : x + 160]).save(photos / f"crop{i:02d}.png")
    out = tmp_path / "out"
    proc = cosconvert(files / "resnet18.pt", "--arch", "torchvision.models:resnet18", *SMALL[2:],
                      "--input-shape", "2,3,32,32", "--data", photos, "--image-norm", "0.5,0.5",
                      "--reconstruct", "--epochs", "1", "--out-dir", out, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("fidelity, ")]
    assert stages == [f"fidelity, {s}" for s in ("converted", "calibrated", "reconstructed", "after fine-tuning")]
    summary = json.loads((out / "report.json").read_text())
    assert "every 10th sample" in summary["evaluated_on"] and "(4 samples)" in summary["evaluated_on"]
    cosines = [summary[f"fidelity_{s}"]["cosine"] for s in ("converted", "calibrated", "reconstructed")]
    print(cosines)
    assert cosines[2] > cosines[0]
    assert summary["conversion"]["calibration"]["status"] in ("improved", "unchanged", "reverted")
    assert summary["conversion"]["reconstruction"]["blocks"]


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorRT"])
def test_validate_fails_on_a_provider_that_ran_nothing(tmp_path, provider):
    """A provider asked for that cannot load here (CUDA without a GPU) or that onnxruntime does not know
    (a typo) ran none of the file: validation fails and says why, never "pass"."""
    from cosconvert.onnx.validate import _provider_loads

    if provider == "CUDAExecutionProvider" and _provider_loads(provider):
        pytest.skip("CUDA loads on this machine")
    _user_net(tmp_path, width=6)
    common = ["net.safetensors", "--arch", "net.py:Net", "--arch-kwargs", '{"width": 6}', "--input-shape", "1,1,8,8",
              "--out-dir", "out", "--quiet"]  # fmt: skip
    for command in ("convert", "export"):
        assert cosconvert(command, *common, cwd=tmp_path).returncode == 0
    proc = cosconvert("validate", "out/model.onnx", "--providers", provider, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not loaded" in proc.stdout + proc.stderr and "validation: pass" not in proc.stdout
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    row = summary["validation"]["results"][0]
    assert not summary["validation"]["passed"] and row["not_run"].startswith("not loaded"), row
