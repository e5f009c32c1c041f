"""Data by name: the built-in ``digits`` set, ``.npz`` files, image folders, or ``module:callable``."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

__all__ = ["digits", "load_data", "held_out_split", "DataError"]

HOLD_OUT_EVERY = 10  # a user's dataset: every 10th sample is held out from fine-tuning and measured on


class DataError(ValueError):
    """A data source that cannot be read, with what to do about it."""


def digits(split: str = "train", test_fraction: float = 0.25) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn), as ``(N, 1, 8, 8)``
    float images scaled to [0, 1] and int64 labels; a fixed split (every 4th sample is test)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    every = round(1 / test_fraction)
    test = torch.arange(len(y)) % every == 0
    keep = test if split == "test" else ~test
    return TensorDataset(x[keep], y[keep])


def _npz(path: Path) -> TensorDataset:
    with np.load(path) as f:
        if "x" not in f:
            raise DataError(
                f"{path} has no array named 'x' (found {list(f.keys())}); save inputs as x= and labels as y="
            )
        x = torch.as_tensor(f["x"])  # integer x (token ids) stays integer; any float becomes float32
        tensors = [x.long() if not x.is_floating_point() else x.float()]
        if "y" in f:
            tensors.append(torch.as_tensor(f["y"]).long())
    return TensorDataset(*tensors)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFiles(Dataset):
    """The images directly inside a folder, sorted by name, unlabeled: each one ``transform(PIL image)``."""

    def __init__(self, path: Path, transform) -> None:
        self.files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def _image_folder(path: Path, size: int, norm: tuple | None = None) -> Dataset:
    """Images resized and centre-cropped to ``size``, in 0..1, then ``(x - mean) / std`` with
    ``norm = (mean, std)``: labelled by subfolder (torchvision's ImageFolder layout) where the folder
    has subfolders, else the images directly inside it, unlabeled."""
    from torchvision import datasets, transforms

    steps = [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
    if norm is not None:
        steps.append(transforms.Normalize(*norm))
    tf = transforms.Compose(steps)
    if any(p.is_dir() for p in path.iterdir()):
        return datasets.ImageFolder(str(path), transform=tf)
    images = ImageFiles(path, tf)
    if not len(images):
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no class subfolders")
    return images


def _callable(spec: str):
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)()
    except (ImportError, AttributeError, FileNotFoundError) as err:
        raise DataError(f"cannot load data from {spec!r}: {err}") from err


def load_data(
    spec: str, split: str = "train", image_size: int = 224, image_norm: tuple | None = None
) -> Dataset | DataLoader:
    """A dataset (or loader) named by ``spec``: ``digits``, a ``.npz`` file with ``x`` (and
    ``y``), an image folder (ImageFolder layout, or unlabeled images; ``image_size`` and
    ``image_norm`` as in :func:`_image_folder`), or ``module:callable``."""
    if spec == "digits":
        return digits(split)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"data file {spec} not found")
        return _npz(path)
    if path.is_dir():
        return _image_folder(path, image_size, image_norm)
    if ":" in spec:
        return _callable(spec)
    raise DataError(f"unknown data {spec!r}: give 'digits', a .npz file, an image folder, or module:callable")


def _loader_like(loader: DataLoader, dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)


def held_out_split(
    spec: str, batch_size: int = 64, image_size: int = 224, image_norm: tuple | None = None
) -> tuple[DataLoader, DataLoader, str]:
    """Loaders for the data named by ``spec``, one to calibrate and fine-tune on and one to measure
    accuracy on, which never share a sample, and what the second one is, in words.

    ``digits`` uses its own test split; any other sized dataset holds out every
    ``HOLD_OUT_EVERY``-th sample (a fixed choice, so runs compare). A stream cannot be split:
    both loaders are the stream, and the words say that accuracy is measured on training data."""
    if spec == "digits":
        train, test = digits("train"), digits("test")
        return DataLoader(train, batch_size), DataLoader(test, batch_size), f"digits test split ({len(test)} samples)"
    data = load_data(spec, image_size=image_size, image_norm=image_norm)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size)
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader, loader, "the training data itself (a stream cannot be split)"
    size = len(dataset)
    if size < HOLD_OUT_EVERY:
        raise DataError(f"{spec} has {size} samples; give at least {HOLD_OUT_EVERY} so some can be held out")
    held = [i for i in range(size) if i % HOLD_OUT_EVERY == 0]
    kept = [i for i in range(size) if i % HOLD_OUT_EVERY]
    words = (
        f"every {HOLD_OUT_EVERY}th sample of {spec}, held out from calibration and fine-tuning ({len(held)} samples)"
    )
    return _loader_like(loader, Subset(dataset, kept)), _loader_like(loader, Subset(dataset, held)), words


def batch_inputs(batch) -> tuple:
    """The model inputs of a batch: a tensor, the first item of an (inputs, labels) pair, or a dict's "input"."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, dict):
        return (batch["input"] if "input" in batch else next(iter(batch.values())),)
    return (batch[0],)
