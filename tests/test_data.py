"""Data by name: the built-in digits split, .npz files, image folders and module:callable."""

import numpy as np
import pytest
import torch
from PIL import Image

from cosconvert.data import DataError, digits, load_data


def test_digits_split_is_fixed_and_disjoint():
    train, test = digits("train"), digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert train.tensors[0].shape[1:] == (1, 8, 8) and 0.0 <= train.tensors[0].min() <= train.tensors[0].max() <= 1.0
    assert torch.equal(digits("test").tensors[1], test.tensors[1])


def test_npz(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3), np.float32), y=np.arange(5))
    x, y = load_data(str(tmp_path / "d.npz")).tensors
    assert x.shape == (5, 3) and y.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    with pytest.raises(DataError, match="no array named 'x'"):
        load_data(str(tmp_path / "bad.npz"))


def test_image_folder(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_data(str(tmp_path), image_size=16)
    x, y = data[3]
    assert len(data) == 4 and x.shape == (3, 16, 16) and y == 1


def test_module_callable_and_unknown():
    data = load_data("cosconvert.data:digits")
    assert len(data) == 1347
    with pytest.raises(DataError, match="unknown data"):
        load_data("no-such-thing")
