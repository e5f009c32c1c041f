"""Save a converted model as its recipe plus tensors; restore it onto a freshly built original.

The file holds only plain data (the :class:`CosineConfig` as a dict and a ``state_dict``), so
it loads with ``torch.load(weights_only=True)`` and no code is ever unpickled. Restoring
replays the recipe on the original architecture, which the user builds with their own code.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cosconvert.atomic import atomic_write
from cosconvert.config import CosineConfig
from cosconvert.conversion import convert, report_of

FORMAT = "cosconvert-recipe/1"


def save(converted: nn.Module, path: str | os.PathLike) -> None:
    """Write ``converted``'s recipe and weights to ``path`` (atomically)."""
    settings = dict(report_of(converted).settings)
    state = {k: v.detach().cpu() for k, v in converted.state_dict().items()}
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "recipe": settings, "state_dict": state}, tmp)


def load_recipe(path: str | os.PathLike) -> dict:
    """The file's contents (recipe and state_dict), loaded without unpickling code."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cosconvert recipe file (expected format {FORMAT})")
    return payload


def restore(original: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Re-apply the saved recipe to ``original`` (a freshly built model) and load the saved weights."""
    payload = load_recipe(path)
    try:
        config = CosineConfig.from_dict(payload["recipe"])
    except (ValueError, ImportError, AttributeError) as err:
        raise ValueError(f"{path} holds conversion settings this cosconvert cannot read: {err}") from err
    converted = convert(original, config)
    device = next(original.parameters(), torch.empty(0)).device
    converted.load_state_dict({k: v.to(device) for k, v in payload["state_dict"].items()})
    return converted
