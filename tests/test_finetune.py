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
from cosconvert.finetuning import finetune


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


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_in_half_precision_on_the_cpu_too(amp, tmp_path, monkeypatch):
    """An explicit ``amp`` autocasts on any device (CUDA's default, bf16, is this path): the cosine
    convs run in the half type, fp16 steps go through an enabled gradient scaler whose state the
    checkpoint keeps, parameters stay float32, and the distillation loss falls. bf16 ends within
    10% of the float32 run's loss. fp16 skips its first steps (16 of 44 here) while the scaler
    brings its loss scale down to 1: at an empty receptive field, a cosine layer's input gradient
    has slope 1/eps, near fp16's limit. So fp16 is held only to within 2x. The default on a CPU is
    float32."""
    scalers = []
    update = torch.amp.GradScaler.update
    monkeypatch.setattr(
        torch.amp.GradScaler, "update", lambda self, *a: scalers.append(self.is_enabled()) or update(self, *a)
    )
    original = train_digits_cnn()
    train_x = digits("train").tensors[0]
    logs, dtypes = {}, {}
    for mode in ("auto", amp):
        converted = cosconvert.convert(original, strip_norms="fold", calibration_data=[train_x[:256]])
        conv = next(m for m in converted.modules() if isinstance(m, cosconvert.nn.CosineConv2d))
        seen = dtypes[mode] = set()
        conv.register_forward_hook(lambda m, i, out, seen=seen: seen.add(out.dtype))
        logs[mode] = finetune(converted, TensorDataset(train_x), teacher=original, epochs=2, lr=3e-3,
                              checkpoint_dir=tmp_path / str(mode), amp=mode)  # fmt: skip
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in converted.parameters())
    half = torch.float16 if amp == "fp16" else torch.bfloat16
    assert dtypes["auto"] == {torch.float32} and half in dtypes[amp]
    assert logs["auto"][-1]["amp"] is None and logs[amp][-1]["amp"] == amp
    assert any(scalers) == (amp == "fp16")
    saved = torch.load(tmp_path / amp / "last.pt", weights_only=True)["scaler"]
    assert bool(saved) == (amp == "fp16")  # an fp16 run resumes with its loss scale
    assert logs[amp][-1]["loss"] < 0.5 * logs[amp][0]["loss"]
    assert logs[amp][-1]["loss"] == pytest.approx(logs["auto"][-1]["loss"], rel=0.1 if amp == "bf16" else 1.0)


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


def _assert_same_tensors(a: dict, b: dict, same: bool = True) -> None:
    """Every tensor of two state_dicts equal (``same``), or at least one of them different."""
    assert a.keys() == b.keys()
    equal = [torch.equal(a[k], b[k]) for k in a]
    assert all(equal) if same else not all(equal), dict(zip(a, equal))


def _steps(lines: list[str]) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in lines if line]


@pytest.mark.slow
def test_resume_after_interrupt_continues_from_the_checkpoint(tmp_path):
    """Interrupted mid third epoch, after a checkpoint at its step 3: the resumed run trains only
    the steps from there on, on the batches an uninterrupted run had there, and ends with its
    weights (dropout's random state restored too). Resumed from a checkpoint whose weights were
    altered, it ends elsewhere: the checkpoint is what it continues from."""
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    steps_per_epoch, every = 4, 3  # batches of 16

    def run(data, folder, resume=False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
        batches = []
        model.register_forward_pre_hook(lambda m, inputs: batches.append(inputs[0].clone()) if m.training else None)
        try:
            model.log = finetune(model, data, epochs=4, batch_size=16, checkpoint_dir=folder,
                                 checkpoint_every=every, resume=resume)  # fmt: skip
        finally:
            model.batches = batches
        return model

    full = run(TensorDataset(x, y), tmp_path / "full")
    assert len(full.batches) == 4 * steps_per_epoch
    with pytest.raises(KeyboardInterrupt):
        run(_Interrupting(x, y, after=64 * 2 + 16 * every + 5), tmp_path / "cut")  # mid third epoch, past step 3
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, every)
    done = saved["epoch"] * steps_per_epoch + saved["step"]
    altered = tmp_path / "altered"
    altered.mkdir()
    saved["model"] = {k: v + 0.5 for k, v in saved["model"].items()}
    torch.save(saved, altered / "last.pt")

    resumed = run(TensorDataset(x, y), tmp_path / "cut", resume=True)
    assert [e.get("resumed_at_step") for e in resumed.log] == [None, None, every, None]  # the log says where
    assert len(resumed.batches) == len(full.batches) - done  # steps after resume
    for got, want in zip(resumed.batches, full.batches[done:]):  # the samples seen after resume
        assert torch.equal(got, want)
    _assert_same_tensors(resumed.state_dict(), full.state_dict())
    from_altered = run(TensorDataset(x, y), altered, resume=True)
    assert len(from_altered.batches) == len(full.batches) - done
    for key, value in from_altered.state_dict().items():
        assert not torch.equal(value, full.state_dict()[key]), key


def test_a_new_run_removes_the_unfinished_writes_of_a_killed_one(tmp_path):
    """A run killed while writing its checkpoint leaves the temporary file behind (nothing can
    catch SIGKILL); the next run in that folder deletes such leftovers and nothing else."""
    leftovers = [".last.pt.t_p9ojju.partial", ".log.json.a1b2c3d4.partial", ".log.csv.zz_99xyz.partial",
                 ".curves.png.qwertyui.partial"]  # fmt: skip
    for name in [*leftovers, "notes.partial", ".last.pt", ".last.pt.backup.partial", ".mine.pt.t_p9ojju.partial"]:
        (tmp_path / name).write_text("x")
    model = torch.nn.Linear(4, 2)
    finetune(model, TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), epochs=1, batch_size=8,
             checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"last.pt", "log.json", "log.csv", "curves.png", "notes.partial", ".last.pt",
                     ".last.pt.backup.partial", ".mine.pt.t_p9ojju.partial"}  # fmt: skip


SCRIPT = Path(__file__).parent / "scripts" / "finetune_run.py"
sys.path.insert(0, str(SCRIPT.parent))
import finetune_run  # noqa: E402 - the script's data, model and sizes


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL a real fine-tuning process mid-epoch and resume it: the resumed process runs exactly the
    steps an uninterrupted run ran after the checkpoint, on the same samples, and ends with its weights."""
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
    per_epoch = finetune_run.SAMPLES // finetune_run.BATCH
    done = interrupted_at["epoch"] * per_epoch + interrupted_at["step"]
    assert 0 < done < finetune_run.EPOCHS * per_epoch
    subprocess.run([sys.executable, SCRIPT, cut, "--resume"], check=True, timeout=300)
    full_steps = _steps((full / "steps-rank0.txt").read_text().splitlines())
    before_kill = _steps((cut / "steps-rank0.txt").read_text().splitlines())
    assert done <= len(before_kill) < len(full_steps) and before_kill == full_steps[: len(before_kill)]
    assert _steps((cut / "steps-rank0-resumed.txt").read_text().splitlines()) == full_steps[done:]
    log = json.loads((cut / "checkpoints" / "log.json").read_text())
    assert log[interrupted_at["epoch"]].get("resumed_at_step") == interrupted_at["step"]
    a = torch.load(full / "final-rank0.pt", weights_only=True)
    _assert_same_tensors(torch.load(cut / "final-rank0.pt", weights_only=True), a)
    assert {p.name for p in (cut / "checkpoints").iterdir()} == {"last.pt", "log.json", "log.csv", "curves.png"}


@pytest.mark.slow
def test_torchrun_two_processes_share_the_data_and_average_gradients(tmp_path):
    """DDP on CPU (gloo), on a free port: each rank trains on its own half of every epoch, the two
    halves the dataset once; the weights equal one process trained on the same global batches
    (the gradients were averaged); only rank 0 writes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, tmp_path,
           "--dropout", "0", "--per-rank-dirs"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_steps((tmp_path / f"steps-rank{r}.txt").read_text().splitlines()) for r in (0, 1)]
    per_rank = finetune_run.SAMPLES // 2 // finetune_run.BATCH
    assert len(ranks[0]) == len(ranks[1]) == finetune_run.EPOCHS * per_rank
    for epoch in range(finetune_run.EPOCHS):
        seen = [sum(steps[epoch * per_rank : (epoch + 1) * per_rank], []) for steps in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(finetune_run.SAMPLES))

    # One process, the same global batches (torch's DistributedSampler order, two ranks' batches together).
    x, y = finetune_run.data()
    model = finetune_run.build(0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, finetune_run.EPOCHS * per_rank)
    for epoch in range(finetune_run.EPOCHS):
        order = torch.randperm(finetune_run.SAMPLES, generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(2 * finetune_run.BATCH):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    r0 = torch.load(tmp_path / "final-rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "final-rank1.pt", weights_only=True)
    _assert_same_tensors(r1, r0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(r0[key], value, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "checkpoints-rank1").exists()
    assert {p.name for p in (tmp_path / "checkpoints-rank0").iterdir()} == {"last.pt", "log.json", "log.csv",
                                                                          "curves.png"}  # fmt: skip
    log = json.loads((tmp_path / "checkpoints-rank0" / "log.json").read_text())
    assert len(log) == finetune_run.EPOCHS


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
