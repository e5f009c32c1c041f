"""Blockwise reconstruction (cosconvert.reconstruct): which blocks, what is fitted, what is held."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import cosconvert
from cosconvert.reconstruction import find_blocks, reconstruct

ROOT = Path(__file__).resolve().parents[1]


class TinyResNet(nn.Module):
    """A stem, two BasicBlocks and a classifier: small enough to compute each block by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines, as a trained network has."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def by_hand(converted, original, x, target):
    """Block layer1.0's MSE, computed from the converted layers themselves (norms dropped):
    relu(conv2(relu(conv1(h))) + h) on the converted stem's output h, against the original block
    on h (target "block") or the original network's own activation there (target "network")."""
    with torch.no_grad():
        h = F.relu(converted.conv1(x))
        b = converted.layer1.get_submodule("0")
        out = F.relu(b.conv2(F.relu(b.conv1(h))) + h)
        source = h if target == "block" else F.relu(original.bn1(original.conv1(x)))
        return F.mse_loss(out, original.layer1[0](source)).item()


def test_auto_blocks_torchvision_resnet18():
    names = find_blocks(torchvision.models.resnet18())
    assert names == ["conv1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]


def test_auto_blocks_timm_stages_and_nested_sequentials():
    timm = pytest.importorskip("timm")
    convnext = find_blocks(timm.create_model("convnext_atto"))
    stages = [[f"stages.{i}.blocks.{j}" for j in range(n)] for i, n in enumerate((2, 2, 6, 2))]
    downsample = [[], *([f"stages.{i}.downsample.1"] for i in (1, 2, 3))]  # the convs between the blocks
    assert convnext == ["stem.0", *(n for d, s in zip(downsample, stages) for n in d + s), "head.fc"]
    effnet = find_blocks(timm.create_model("efficientnet_b0"))  # blocks.N is itself a Sequential of blocks
    assert effnet[:4] == ["conv_stem", "blocks.0.0", "blocks.1.0", "blocks.1.1"] and len(effnet) == 19
    assert effnet[-2:] == ["conv_head", "classifier"]


def test_auto_blocks_transformer_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    names = ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "pooler.dense"]
    assert find_blocks(transformers.BertModel(config)) == names


def test_auto_blocks_fall_back_to_top_level_children():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_blocks(model) == ["0", "2"]


@pytest.mark.parametrize("target", ["network", "block"])
def test_reconstruction_lowers_the_block_loss_computed_by_hand(target):
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original, strip_norms="drop")
    x = torch.rand(32, 1, 8, 8)
    before = by_hand(converted, original, x, target)
    result = reconstruct(converted, original, [x], blocks=["layer1.0"], steps=30, lr=3e-3, batch_size=16, target=target)
    first = result["blocks"][0]
    assert first["loss_before"] == pytest.approx(before, rel=1e-4)
    after = by_hand(converted, original, x, target)  # the converted network's own layers were trained
    assert first["loss_after"] == pytest.approx(after, rel=1e-4)
    assert after < 0.5 * before


def test_a_block_is_never_left_worse():
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original, strip_norms="drop")
    x = torch.rand(32, 1, 8, 8)
    weights = {k: v.clone() for k, v in converted.state_dict().items()}
    result = reconstruct(converted, original, [x], steps=5, lr=50.0, batch_size=32, refit=False)  # diverges
    assert all(b["loss_after"] == b["loss_before"] for b in result["blocks"])
    assert all(torch.equal(weights[k], v) for k, v in converted.state_dict().items())


def test_affine_mode_trains_only_gains_and_biases():
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original, strip_norms="fold")
    weight = converted.layer1.get_submodule("0").conv1.weight.clone()
    gain = converted.layer1.get_submodule("0").conv1.gain.clone()
    reconstruct(converted, original, [torch.rand(32, 1, 8, 8)], steps=20, train="affine", blocks=["layer1.0"])
    assert torch.equal(converted.layer1.get_submodule("0").conv1.weight, weight)
    assert not torch.equal(converted.layer1.get_submodule("0").conv1.gain, gain)


def test_a_model_moved_after_convert_calibrates_and_reconstructs_there():
    """convert keeps each stripped normalizer beside its layer, outside the module tree; ``.to()``
    must move it too. Found on a GPU (converted on the CPU, reconstructed on CUDA: "weight is on
    cpu"); here the move is to float64, which fails the same way if the normalizer stays behind."""
    original = trained_like(TinyResNet())
    x = torch.rand(16, 1, 8, 8)
    reference = cosconvert.convert(original, strip_norms="fold")
    cosconvert.calibrate(reference, original, [x])  # all in float32
    converted = cosconvert.convert(original, strip_norms="fold").double()
    original64 = original.double()
    cosconvert.calibrate(converted, original64, [x.double()])
    for a, b in zip(reference.parameters(), converted.parameters()):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the stem's target: the original conv, then the BatchNorm convert stripped
        before = F.mse_loss(converted.conv1(x.double()), original64.bn1(original64.conv1(x.double()))).item()
    result = reconstruct(converted, original64, [x.double()], blocks=["conv1"], steps=2)
    assert result["blocks"][0]["loss_before"] == pytest.approx(before, rel=1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_fits_in_half_precision_on_the_cpu_too(amp, monkeypatch):
    """An explicit ``amp`` autocasts on any device, so the path CUDA runs by default is exercised
    here: the block's convolutions run in the half type, fp16 steps go through an enabled gradient
    scaler (bf16 needs none), the parameters stay float32, and each block ends within 10% of the
    float32 fit's loss. The default on a CPU is float32."""
    scalers = []
    update = torch.amp.GradScaler.update
    monkeypatch.setattr(
        torch.amp.GradScaler, "update", lambda self, *a: scalers.append(self.is_enabled()) or update(self, *a)
    )
    original = trained_like(TinyResNet())
    x = torch.rand(64, 1, 8, 8)
    results, dtypes = {}, {}
    for mode in ("auto", amp):
        torch.manual_seed(0)
        converted = cosconvert.convert(original, strip_norms="fold")
        seen = dtypes[mode] = set()
        converted.layer1.get_submodule("0").conv1.register_forward_hook(
            lambda m, i, out, seen=seen: seen.add(out.dtype)
        )
        results[mode] = reconstruct(converted, original, [x], steps=40, batch_size=32, amp=mode)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in converted.parameters())
    half = torch.float16 if amp == "fp16" else torch.bfloat16
    assert dtypes["auto"] == {torch.float32} and half in dtypes[amp]
    assert results["auto"]["amp"] is None and results[amp]["amp"] == amp
    assert any(scalers) == (amp == "fp16")
    for full, mixed in zip(results["auto"]["blocks"], results[amp]["blocks"]):
        assert mixed["loss_after"] < 0.5 * mixed["loss_before"]
        assert mixed["loss_after"] == pytest.approx(full["loss_after"], rel=0.1)


def test_holds_one_block_and_leaves_the_network_as_it_was():
    """The converted network runs only up to the block being fitted (its classifier is never
    reached), and afterwards has no hooks and its own structure: the same forward code and modules."""
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original, strip_norms="fold")
    code, names = converted.code, [n for n, _ in converted.named_modules()]
    calls = []
    converted.fc.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(32, 1, 8, 8)
    reconstruct(converted, original, [x], blocks=["layer1.0", "layer1.1"], steps=3, batch_size=16)
    assert calls == []
    assert converted.code == code and [n for n, _ in converted.named_modules()] == names
    assert all(not m._forward_pre_hooks for m in converted.modules())
    with torch.no_grad():
        assert torch.isfinite(converted(x)).all()


def test_offload_moves_each_block_alone_and_fits_it_as_without(monkeypatch):
    """offload=True, forced on the CPU: each block (converted, original) goes to the device and back by
    itself, never the whole network, and the fit is the one without offloading, bit for bit."""
    original = trained_like(TinyResNet())
    x = torch.rand(32, 1, 8, 8)
    plain = cosconvert.convert(original, strip_norms="fold")
    torch.manual_seed(0)
    want = reconstruct(plain, original, [x], blocks=["layer1.0", "layer1.1"], steps=5, batch_size=16)
    offloaded = cosconvert.convert(original, strip_norms="fold")
    moved, to = [], nn.Module.to

    def spy(self, *args, **kwargs):
        moved.append((self, str(args[0]) if args else str(kwargs)))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", spy)
    torch.manual_seed(0)
    got = reconstruct(offloaded, original, [x], blocks=["layer1.0", "layer1.1"], steps=5, batch_size=16,
                      device="cpu", offload=True)  # fmt: skip
    monkeypatch.undo()
    whole = [m for m, _ in moved if m is offloaded or m is original]
    assert len(whole) == 2, "each network moves once, to stay on the CPU; never to the device"
    parts = [m for m, _ in moved if m is not offloaded and m is not original]
    size = sum(p.numel() for p in offloaded.parameters())
    assert len(parts) >= 2 * 2 * 2, "each block (converted and original) moves there and back"
    assert all(parts.count(m) % 2 == 0 and sum(p.numel() for p in m.parameters()) < size / 2 for m in parts)
    assert got["offload"] and all(row["offloaded"] > 0 for row in got["blocks"])
    for a, b in zip(plain.state_dict().values(), offloaded.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss_after"] for r in got["blocks"]] == [r["loss_after"] for r in want["blocks"]]


@pytest.mark.slow
def test_transformer_layers_with_keyword_inputs():
    """BERT's layers are called with an attention mask as well as the hidden states."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50, max_position_embeddings=16)  # fmt: skip
    original = transformers.BertModel(config).eval()
    converted = cosconvert.convert(original, strip_norms="fold")
    ids = torch.randint(0, 50, (32, 12))
    result = reconstruct(converted, original, [ids], steps=30, batch_size=16)
    assert [b["block"] for b in result["blocks"]] == ["encoder.layer.0", "encoder.layer.1", "pooler.dense"]
    assert all(b["loss_after"] < b["loss_before"] for b in result["blocks"])


def test_report_section():
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original, strip_norms="drop")
    reconstruct(converted, original, [torch.rand(32, 1, 8, 8)], blocks=["layer1.0", "layer1.1"], steps=4, batch_size=16)
    report = converted.cosine_report
    section = report.to_dict()["reconstruction"]
    assert section["samples"] == 32 and [b["block"] for b in section["blocks"]] == ["layer1.0", "layer1.1"]
    assert {"loss_before", "loss_after", "steps", "seconds"} <= set(section["blocks"][0])
    assert "reconstruction: layer1.0" in str(report)


def test_bad_blocks_are_one_clear_error():
    original = trained_like(TinyResNet())
    converted = cosconvert.convert(original)
    x = [torch.rand(8, 1, 8, 8)]
    with pytest.raises(ValueError, match="overlap"):
        reconstruct(converted, original, x, blocks=["layer1", "layer1.0"])
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        reconstruct(converted, original, x, blocks=["layer9"])
    with pytest.raises(ValueError, match="no module named 'layer9'"):  # one name, not nine letters
        reconstruct(converted, original, x, blocks="layer9")


@pytest.mark.slow
def test_deep_net_on_real_digits_keeps_the_original_accuracy(tmp_path):
    """The example's converged setting, without its distillation runs: a ResNet-18-depth BatchNorm net
    (stages 12 to 96 wide) trained for 10 epochs on 4,000 MNIST digits, norms folded away, each stage
    reconstructed as one block on 512 unlabeled images, reaches the original's accuracy on 1,000 held-out
    digits minus 1. Measured (one thread, original seeds 0-2): 98.5 -> 98.5, 98.1 -> 97.7, 98.3 -> 97.8;
    with two threads, over five originals, gaps of 0.0 to 0.4 (docs/reconstruction.md). The test's former
    setting (width 16, 8 epochs on 2,000 digits, residual blocks, 200 steps) left gaps of 0.2 to 1.3 on
    one machine: it failed on a faster CPU whose kernels trained another original."""
    args = ["--quick", "--strip", "fold", "--width", "12", "--train-size", "4000", "--test-size", "1000",
            "--epochs", "10", "--samples", "512", "--blocks", "stages", "--steps", "400", "--threads", "1",
            "--out", tmp_path, "--cache", tmp_path / "original.pt"]  # fmt: skip
    proc = subprocess.run([sys.executable, ROOT / "examples" / "mnist_resnet_reconstruct.py", *map(str, args)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "reconstruction.json").read_text())
    original = result["original"]["accuracy"]
    rows = result["strip"]["fold"]["rows"]
    reconstructed = next(v for k, v in rows.items() if k.startswith("reconstruct"))
    assert original > 90
    assert reconstructed["accuracy"] >= original - 1
    assert reconstructed["accuracy"] > rows["calibration alone"]["accuracy"]


def test_cli_reconstruct_without_data_is_one_line_exit_2(tmp_path):
    from cosconvert.demo import DigitsCNN

    torch.save(DigitsCNN().state_dict(), tmp_path / "d.pt")
    args = ["convert", tmp_path / "d.pt", "--arch", "cosconvert.demo:DigitsCNN", "--reconstruct", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "cosconvert", *map(str, args), "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cosconvert: error: --reconstruct needs --data (inputs to reconstruct on; labels are not needed)"
    ]


@pytest.mark.slow
def test_cli_reconstructs_the_blocks_it_is_given(tmp_path):
    """--reconstruct-blocks names the blocks (and implies --reconstruct); a name the model lacks is one
    line, exit 2."""
    from cosconvert.demo import DigitsCNN

    torch.save(DigitsCNN().state_dict(), tmp_path / "d.pt")
    base = ["convert", tmp_path / "d.pt", "--arch", "cosconvert.demo:DigitsCNN", "--data", "digits", "--quiet"]

    def run(blocks: str, out: str):
        return subprocess.run([sys.executable, "-m", "cosconvert", *map(str, base), "--reconstruct-blocks", blocks,
                               "--out-dir", str(tmp_path / out)], capture_output=True, text=True, timeout=600)  # fmt: skip

    proc = run("features.0,features.2, fc", "good")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "good" / "report.json").read_text())
    section = report["conversion"]["reconstruction"]
    assert [b["block"] for b in section["blocks"]] == ["features.0", "features.2", "fc"]
    proc = run("features.0,features.9", "bad")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cosconvert: error: --reconstruct-blocks: no module named 'features.9' in the converted network"
    ]


def test_block_inputs_stepped_through_the_graph_match_a_pass_from_the_start():
    """The stepped feed (the network run once, waiting at each block) gives each block what a pass
    from the start gives it, with the blocks before it changed in between, as training changes them."""
    from cosconvert.reconstruction import _capture, _Feeds, _Staged

    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    ).eval()  # fmt: skip
    x = torch.randn(4, 3, 6, 6)
    converted = cosconvert.convert(torch.fx.symbolic_trace(original), example_inputs=(x,))
    names = ["0", "2", "4", "6"]
    staged = _Staged(converted, torch.fx.symbolic_trace(original), names)
    batches = [(x[:2],), (x[2:],)]
    feeds = _Feeds(staged.run, {n: staged.converted[n] for n in names}, batches)
    assert feeds.stepping
    for name in names:
        stepped = feeds.inputs(name)
        fresh = _capture(staged.run, staged.converted[name], batches)
        for (a, _), (b, _) in zip(stepped, fresh):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        with torch.no_grad():  # as training would: the block changes before the next one is fed
            for p in staged.converted[name].parameters():
                p.add_(0.1 * torch.randn_like(p))
    staged.close()
