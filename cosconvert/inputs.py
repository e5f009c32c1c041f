"""A run's example input, in one place: its shape, its dtype and, for token ids, the range they are
drawn from. Probing the model, measuring fidelity, exporting and validating all take their inputs
from one :class:`InputSpec`, so a text model gets token ids inside its vocabulary everywhere.

    InputSpec.parse("2,3,224,224")     images (float32)
    InputSpec.parse("2,16:int64", m)   token ids of m's vocabulary
    InputSpec.guess(m)                 from m's first layer (an embedding: token ids)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from cosconvert.errors import InputError

__all__ = ["InputSpec", "vocabulary", "EXAMPLE_BATCH"]

EXAMPLE_BATCH = 2  # a batch of 1 lets tracers fix the batch size
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int64": torch.int64, "int32": torch.int32}  # fmt: skip


def vocabulary(model: nn.Module) -> int | None:
    """How many token ids ``model`` takes: its config's ``vocab_size`` (transformers), else its first
    embedding's size; None for a model without one."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    first = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if first is None else first.num_embeddings


@dataclass(frozen=True)
class InputSpec:
    """One positional input: ``shape`` (batch first), ``dtype``, and for integer inputs the ids are
    drawn from ``[0, high)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None

    @property
    def tokens(self) -> bool:
        return not self.dtype.is_floating_point

    @classmethod
    def parse(cls, text: str, model: nn.Module | None = None) -> InputSpec:
        """``"2,3,224,224"`` or ``"2,16:int64"`` (token ids of ``model``'s vocabulary)."""
        dims, _, dtype = text.partition(":")
        try:
            shape = tuple(int(s) for s in dims.split(","))
        except ValueError as err:
            raise InputError(f"--input-shape {text!r} is not a comma-separated list of integers") from err
        if not shape or min(shape) < 1:
            raise InputError(f"--input-shape {text!r} must have positive sizes, e.g. 2,3,224,224 or 2,16:int64")
        if dtype and dtype not in DTYPES:
            raise InputError(f"--input-shape {text!r}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return cls.of(shape, DTYPES.get(dtype or "float32"), model)

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: torch.dtype, model: nn.Module | None = None) -> InputSpec:
        high = (vocabulary(model) if model is not None else None) or 2 if not dtype.is_floating_point else None
        return cls(tuple(shape), dtype, high)

    @classmethod
    def like(cls, example: Tensor, model: nn.Module | None = None, batch: int | None = None) -> InputSpec:
        """The spec of ``example`` (a batch of real inputs), at ``batch`` if given."""
        shape = tuple(example.shape) if batch is None else (batch, *example.shape[1:])
        return cls.of(shape, example.dtype, model)

    @classmethod
    def candidates(cls, model: nn.Module, probe: bool = False) -> list[InputSpec]:
        """What the model's first embedding, linear or conv layer takes, likeliest first: token ids
        (2, 16), vectors, signals of 128, volumes, images at 224x224 (``probe``: 32x32 first, which is
        faster to run, then 224 at batch 1). Floats in the layer's dtype; [] without such a layer."""
        first = next((m for m in model.modules() if isinstance(m, (nn.Embedding, _ConvNd, nn.Linear))), None)
        if first is None or first.weight.is_meta:
            return []
        if isinstance(first, nn.Embedding):
            return [cls.of((EXAMPLE_BATCH, 16), torch.int64, model)]
        dtype = first.weight.dtype
        if isinstance(first, nn.Linear):
            shapes = [(EXAMPLE_BATCH, first.in_features)]
        elif first.weight.dim() == 3:
            shapes = [(EXAMPLE_BATCH, first.in_channels, 128)]
        elif first.weight.dim() == 5:
            shapes = [(1, first.in_channels, 8, 32, 32) if probe else (EXAMPLE_BATCH, first.in_channels, 16, 64, 64)]
        else:
            channels = first.in_channels
            shapes = [(EXAMPLE_BATCH, channels, 32, 32), (1, channels, 224, 224)] if probe else [(EXAMPLE_BATCH, channels, 224, 224)]
        return [cls(shape, dtype) for shape in shapes]

    @classmethod
    def guess(cls, model: nn.Module) -> InputSpec:
        """The likeliest of :meth:`candidates`."""
        found = cls.candidates(model)
        if not found:
            raise InputError("cannot infer the input shape: give --input-shape, e.g. 2,3,224,224 or 2,16:int64")
        return found[0]

    def at_batch(self, batch: int) -> InputSpec:
        return replace(self, shape=(batch, *self.shape[1:]))

    def zeros(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def random(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """Seeded random inputs: normal for floats, ids in ``[0, high)`` for tokens."""
        if self.tokens:
            return torch.randint(0, self.high, self.shape, generator=generator, dtype=self.dtype).to(device)
        return torch.randn(self.shape, generator=generator).to(device=device, dtype=self.dtype)

    def __str__(self) -> str:
        if self.tokens:
            return f"{self.shape} {str(self.dtype).removeprefix('torch.')} token ids below {self.high}"
        return str(self.shape) if self.dtype == torch.float32 else f"{self.shape} {str(self.dtype).removeprefix('torch.')}"

    def text(self) -> str:
        """As ``--input-shape`` takes it: ``"2,16:int64"``."""
        dims = ",".join(map(str, self.shape))
        return dims if self.dtype == torch.float32 else f"{dims}:{str(self.dtype).removeprefix('torch.')}"
