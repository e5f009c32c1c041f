"""The README's examples and the scripts in examples/ run as written."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def run(*args, cwd):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_readme_python_example(tmp_path):
    """The README's Python block, verbatim, then a check that its validation passed."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "resnet18-cos.onnx" in b)
    script = block + "\nassert cosconvert.validate(path, again).passed\n"
    (tmp_path / "example.py").write_text(script)
    proc = run("example.py", cwd=tmp_path)
    assert "pass" in proc.stdout and (tmp_path / "resnet18-cos.onnx").exists()


def test_readme_run_example(tmp_path):
    """The README's `cosconvert.run` block, verbatim: the run passes and its files exist."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "cosconvert.run(" in b)
    script = block + "\nimport os\nassert report.status == 'pass' and all(map(os.path.exists, report.files))\n"
    (tmp_path / "example.py").write_text(script)
    run("example.py", cwd=tmp_path)
    assert (tmp_path / "digits-cosine" / "model.onnx").exists()


@pytest.mark.slow
def test_readme_digits_commands(tmp_path):
    """`python examples/train_digits_cnn.py` then the README's `cosconvert digits_cnn.pt ...` command."""
    train, convert = re.search(
        r"\n(python examples/train_digits_cnn.py .*)\n(cosconvert digits_cnn.pt .*)\n", README
    ).groups()
    run(*(ROOT / train.split()[1], *train.split()[2:]), cwd=tmp_path)
    run("-m", "cosconvert", *convert.split()[1:], "--quiet", cwd=tmp_path)
    summary = json.loads((tmp_path / "digits_cnn-cosine" / "report.json").read_text())
    assert summary["validation"]["passed"] and summary["evaluated_on"].startswith("digits test split")
    # distilled for 3 epochs from a ~98% original: stays a working classifier on held-out digits
    assert summary["accuracy_after"]["accuracy"] > 85


def paper_comparison():
    """examples/paper_comparison.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("paper_comparison", ROOT / "examples" / "paper_comparison.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_paper_comparison_datasets():
    """MNIST split 4,000 / 1,000 with 100 test digits per class; the reviews are the 12,808
    fresh or rotten snippets (7,403 fresh), a binary bag of 1,000 words; validation comes out of train."""
    pc = paper_comparison()
    x, y, x_test, y_test = pc.dataset("mnist", validation=False)
    assert x.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(y_test).tolist() == [100] * 10 and 0 <= x.min() and x.max() == 1
    x, y, x_test, y_test = pc.dataset("reviews", validation=False)
    assert len(y) + len(y_test) == 12808 and int(y.sum() + y_test.sum()) == 7403
    assert x.shape[1] == 1000 and set(x.unique().tolist()) == {0.0, 1.0}
    x_fit, y_fit, x_val, y_val = pc.dataset("reviews", validation=True)
    assert len(y_fit) + len(y_val) == len(y) and torch.equal(x_val, x[::5])


def test_paper_comparison_sweep_grows():
    """The rate grid (half-decade steps from the method's center) grows one step past an end that
    holds the best rate, downwards while no rate trains (error at 3/4 of chance or more), and stops
    once the best rate is inside it (ties: nearest the center) or the next step passes 1000x."""
    pc = paper_comparison()
    assert [pc.factor(k) for k in range(-3, 4)] == [0.0316, 0.1, 0.316, 1, 3.16, 10, 31.6]
    grid = range(-2, 3)
    assert pc.next_step(dict(zip(grid, [2.0, 3.0, 4.0, 90.0, 90.0])), chance=90) == -3
    assert pc.next_step(dict(zip(grid, [9.0, 3.0, 2.0, 1.0, 0.5])), chance=90) == 3
    assert pc.next_step(dict(zip(grid, [9.0, 3.0, 2.0, 2.5, 4.0])), chance=90) is None
    assert pc.next_step(dict(zip(grid, [90.0, 90.0, 70.0, 90.0, 90.0])), chance=90) == -3
    assert pc.next_step(dict(zip(grid, [70.0, 90.0, 60.0, 90.0, 90.0])), chance=90) is None
    assert pc.next_step(dict.fromkeys(grid, 1.0), chance=90) is None
    assert pc.best_step({-1: 2.0, 0: 3.0, 1: 2.0}) == -1 and pc.best_step({-1: 2.0, 0: 2.0, 1: 2.0}) == 0
    assert pc.next_step({k: 10.0 + k for k in range(-6, 3)}, chance=90) is None


@pytest.mark.slow
def test_paper_comparison_every_method_trains(tmp_path):
    """The script end to end on digits, 1 seed, 4 epochs: every method and head, at its best rate of
    the sweep, ends far below chance (90% error), and that rate lies inside its grid; the tables and
    plots land in a new folder."""
    pc = paper_comparison()
    out = tmp_path / "new" / "folder"
    args = ["--only", "digits/MLP,digits/CNN", "--seeds", "1", "--epochs", "4", "--out", out]
    run(ROOT / "examples" / "paper_comparison.py", *args, cwd=tmp_path)
    results = json.loads((out / "paper_comparison.json").read_text())
    best = results["best"]
    finals = {(r["data"], r["network"], r["method"], r["head"]): r for r in results["finals"]
              if r["lr"] == best["/".join((r["data"], r["network"], r["method"], r["head"]))]}  # fmt: skip
    assert len(finals) == 2 * 10
    for key, r in finals.items():
        assert r["error"] < 40, (key, r["lr"], r["errors"])
        tried = sorted(s["lr"] for s in results["sweep"] if (s["data"], s["network"], s["method"], s["head"]) == key)
        assert tried[0] < r["lr"] < tried[-1] or abs(pc.step_of(r)) == pc.SWEEP_LIMIT, (key, r["lr"], tried)
    table = (out / "paper_comparison_results.md").read_text()
    assert "| centered cosine / no-gain head |" in table and "- digits CNN, cosine (" in table
    assert all(
        (out / name).stat().st_size > 1000 for name in ("paper_comparison.png", "paper_comparison_diagnosis.png")
    )
