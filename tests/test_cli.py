"""The installed command line, driven in a subprocess."""

import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cosconvert", "demo", "--out-dir", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "report.json").read_text())
    assert summary["validation"]["passed"]
    assert summary["accuracy"]["distilled"] >= summary["accuracy"]["original"] - 2.0
    assert (out / "model.onnx").exists() and (out / "converted.pt").exists()


def test_unwritable_output_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "cosconvert", "demo", "--out-dir", str(blocker / "x")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "--out-dir" in proc.stderr
