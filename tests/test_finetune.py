"""Fine-tuning on real data: label-free distillation brings the converted digits CNN back."""

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
