"""Fine-tuning on real data: label-free distillation brings the converted digits CNN back."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import cosconvert
from cosconvert.data import digits
from cosconvert.demo import accuracy, train_digits_cnn
from cosconvert.finetune import finetune


@pytest.mark.slow
def test_label_free_distillation_recovers_accuracy(tmp_path):
    original = train_digits_cnn()
    target = accuracy(original)
    train_x = digits("train").tensors[0]
    converted = cosconvert.convert(
        original, strip_norms="fold", calibration_data=DataLoader(TensorDataset(train_x), 256)
    )
    log = finetune(converted, TensorDataset(train_x), teacher=original, epochs=5, lr=3e-3, temperature=2.0, progress=False,
                   checkpoint_dir=tmp_path)  # fmt: skip
    reached = accuracy(converted)
    print(f"original {target:.2f}%, distilled {reached:.2f}%", log)
    assert reached >= target - 0.5
    assert (tmp_path / "last.pt").exists() and len(log) == 5


class _Interrupting(TensorDataset):
    """Raises KeyboardInterrupt (as Ctrl-C would) after ``after`` items."""

    def __init__(self, *tensors, after):
        super().__init__(*tensors)
        self.left = after

    def __getitem__(self, index):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_resume_after_interrupt_reaches_the_same_weights(tmp_path):
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def run(data, folder, resume=False):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        finetune(model, data, epochs=4, batch_size=16, checkpoint_dir=folder, resume=resume, progress=False)
        return model

    full = run(TensorDataset(x, y), tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(_Interrupting(x, y, after=64 * 2 + 20), tmp_path / "cut")  # mid third epoch
    resumed = run(TensorDataset(x, y), tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.weight, full.weight, atol=0, rtol=0)


SCRIPT = Path(__file__).parent / "scripts" / "finetune_run.py"


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a real fine-tuning process mid-epoch, resume it, and compare with an uninterrupted run."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    subprocess.run([sys.executable, SCRIPT, full], check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, SCRIPT, cut, "--slow", "0.01"])
    ckpt = cut / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere past the first checkpoint, mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (cut / "final-rank0.pt").exists()
    interrupted_at = torch.load(ckpt, weights_only=True)
    assert (interrupted_at["epoch"], interrupted_at["step"]) < (3, 0)
    subprocess.run([sys.executable, SCRIPT, cut, "--resume"], check=True, timeout=300)
    a = torch.load(full / "final-rank0.pt", weights_only=True)
    b = torch.load(cut / "final-rank0.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0)
    assert {p.name for p in (cut / "checkpoints").iterdir()} == {"last.pt", "log.json", "log.csv", "curves.png"}


def test_torchrun_two_processes(tmp_path):
    """DDP on CPU (gloo): both ranks end with the same weights; only rank 0 writes checkpoints."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571", SCRIPT, tmp_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "final-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "final-rank1.pt", weights_only=True)
    for key in r0:
        torch.testing.assert_close(r1[key], r0[key], atol=0, rtol=0)
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"last.pt", "log.json", "log.csv", "curves.png"}
    log = json.loads((tmp_path / "checkpoints" / "log.json").read_text())
    assert len(log) == 3


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input": self.x[i], "label": self.y[i]}


def test_dict_batches_and_a_given_dataloader_train(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    y = (x[:, 0] > 0).long()  # a separable task: the loss must fall
    model = torch.nn.Linear(2, 2)
    loader = DataLoader(_Dicts(x, y), batch_size=16)
    log = finetune(model, loader, epochs=4, lr=0.05, eval_data=loader, progress=False, checkpoint_dir=tmp_path)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["accuracy"] > 90
    assert (tmp_path / "log.csv").read_text().splitlines()[0].startswith("epoch,")
