"""The pipeline as one library call, and every face of it on image and text models (issue 28)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from test_cli import _user_net, cosconvert

import cosconvert as cc
from cosconvert.demo import DigitsCNN
from cosconvert.errors import InputError
from cosconvert.inputs import InputSpec

TEXT = {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "num_labels": 3}


def _text_classifier() -> transformers.DistilBertForSequenceClassification:
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**TEXT)).eval()


def _check_report(report: cc.RunReport, out) -> None:
    assert report.status == "pass", report.validation_text
    assert report.files and all(p and __import__("os").path.exists(p) for p in report.files), report.files
    assert json.loads((out / "report.json").read_text()) == report.summary


def test_run_on_an_image_model(tmp_path):
    torch.manual_seed(0)
    report = cc.run(DigitsCNN().eval(), data="digits", strip_norms="fold", epochs=1, out_dir=tmp_path, verbose=False)
    _check_report(report, tmp_path)
    assert report.summary["fidelity_after"]["samples"] == 450  # the whole digits test split
    assert report.validation["path"] == str(tmp_path / "model.onnx")  # where the file is, not where it was staged
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*tmp_path.iterdir(), *(tmp_path / "checkpoints").iterdir()]}
    assert len(set(modes.values())) == 2, modes  # the checkpoints folder's mode, and every file's
    assert {"fidelity_converted", "fidelity_calibrated", "fidelity_after", "finetune"} <= report.summary.keys()


def test_run_on_a_text_model_draws_token_ids_inside_its_vocabulary(tmp_path):
    report = cc.run(_text_classifier(), out_dir=tmp_path, verbose=False)
    _check_report(report, tmp_path)
    assert report.summary["input_spec"] == "2,16:int64"  # guessed from its embedding


def test_input_spec():
    model = _text_classifier()
    spec = InputSpec.parse("4,9:int64", model)
    ids = spec.random(torch.Generator().manual_seed(0))
    assert ids.dtype == torch.int64 and ids.shape == (4, 9) and 0 <= ids.min() and ids.max() < 100
    assert spec.text() == "4,9:int64" and InputSpec.parse(spec.text(), model) == spec
    assert InputSpec.parse("2,3,8,8").random().dtype == torch.float32
    for bad in ("2,x", "0,3", "2,16:int8"):
        with pytest.raises(InputError):
            InputSpec.parse(bad)


def test_cli_text_classifier_end_to_end_with_and_without_token_data(tmp_path):
    torch.save(_text_classifier().state_dict(), tmp_path / "distilbert.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz", x=rng.integers(0, 100, (120, 16)), y=rng.integers(0, 3, 120))
    common = ["distilbert.pt", "--arch", "transformers:DistilBertForSequenceClassification", "--arch-kwargs",
              json.dumps(TEXT), "--quiet"]  # fmt: skip
    for extra, out in (([], "plain"), (["--data", "tokens.npz"], "data")):
        proc = cosconvert(*common, *extra, "--out-dir", out, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((tmp_path / out / "report.json").read_text())
        assert summary["validation"]["passed"] and summary["input_spec"] == "2,16:int64", summary["input_spec"]
    assert "accuracy_calibrated" in summary  # the token data was calibrated on and measured


@pytest.mark.slow
def test_cli_steps_chain_on_one_folder(tmp_path):
    """convert --data (32x32 images), then finetune, export and validate in the same folder: each exits 0,
    export and validate take the data's shape, and report.json keeps every step's section."""
    _user_net(tmp_path, width=6)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((120, 1, 32, 32)).astype("float32"), y=rng.integers(0, 10, 120))
    common = ["net.safetensors", "--arch", "net.py:Net", "--arch-kwargs", '{"width": 6}', "--out-dir", "out", "--quiet"]
    steps = [("convert", "--data", "data.npz"), ("finetune", "--data", "data.npz", "--epochs", "1"), ("export",)]
    for command, *extra in steps:
        proc = cosconvert(command, *common, *extra, cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
    proc = cosconvert("validate", "out/model.onnx", "--data", "data.npz", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["input_shape"] == [2, 1, 32, 32]
    assert {"fidelity_calibrated", "finetune", "fidelity_after", "validation", "conversion"} <= summary.keys()
    names = {p.rsplit("/", 1)[-1] for p in summary["files"]}
    assert {"converted.pt", "model.onnx", "report.json", "last.pt"} <= names, names


class _BreaksAt(torch.utils.data.Dataset):
    """The digits train split, whose sample ``at`` cannot be read: a data source that breaks mid-run."""

    def __init__(self, at: int) -> None:
        from cosconvert.data import digits

        self.data, self.at = digits("train"), at

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == self.at:
            raise OSError("the data went away")
        return self.data[index]


def test_a_failed_run_leaves_the_previous_runs_files_as_they_were(tmp_path):
    """A good run, then a run into the same folder whose data fails during fine-tuning (after its
    conversion): the folder's converted.pt, model.onnx and report.json are still the good run's, still
    validate together, and nothing of the failed run is left under a final name."""
    torch.manual_seed(0)
    good = cc.run(DigitsCNN().eval(), data="digits", strip_norms="fold", out_dir=tmp_path, verbose=False)
    assert good.status == "pass"
    before = {name: (tmp_path / name).read_bytes() for name in ("converted.pt", "model.onnx", "report.json")}
    with pytest.raises(OSError, match="went away"):
        broken = torch.utils.data.DataLoader(_BreaksAt(1000), batch_size=64)  # calibration reads the first 512
        cc.run(DigitsCNN().eval(), data=broken, epochs=1, out_dir=tmp_path, verbose=False)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run-")]
    restored = cc.restore(DigitsCNN().eval(), tmp_path / "converted.pt")
    assert cc.validate(tmp_path / "model.onnx", restored).passed


def test_ctrl_c_during_export_keeps_the_previous_cli_run_whole(tmp_path):
    """A good CLI run, then a CLI run into the same folder that the user interrupts while it exports
    (Ctrl-C arrives inside torch.onnx.export): it exits 130, says nothing was kept and does not offer
    --resume, and the folder still holds the good run's files, which validate together."""
    _user_net(tmp_path, width=6)
    common = ["net.safetensors", "--arch", "net.py:Net", "--arch-kwargs", '{"width": 6}', "--out-dir", "out", "--quiet"]
    good = cosconvert(*common, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    interrupted = (
        "import sys, torch\n"
        "def ctrl_c(*args, **kwargs):\n    raise KeyboardInterrupt\n"
        "torch.onnx.export = ctrl_c\n"
        "from cosconvert.cli import main\n"
        f"sys.exit(main({[*common, '--epochs', '0']!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", interrupted], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted while exporting" in proc.stderr and "nothing of this run was kept" in proc.stderr, proc.stderr
    assert "--resume" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".run-")], "the interrupted run's staging folder"
    proc = cosconvert("validate", "out/model.onnx", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
