"""``CosineConfig``: how a network is converted, as one validated object.

It is what :func:`cosconvert.convert` takes, what the module walk, the graph rewrite, the norm
stripper and :class:`~cosconvert.calls.CosineCalls` read, what a recipe file saves and what the
ONNX file's ``conversion_settings`` metadata holds (:meth:`CosineConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CosineConfig", "GAINS", "STRIP_MODES"]

GAINS = ("none", "scalar", "channel")
STRIP_MODES = (False, "drop", "fold")


@dataclass(frozen=True)
class CosineConfig:
    """How each dot product becomes a cosine (Luo et al., 2017), and what else the conversion does.

    Args:
        centered: Pearson correlation (both vectors centered) instead of cosine.
        gain: ``"channel"`` (a learned gain per output unit, so the converted net can reach the
            scales its activations and logits need), ``"scalar"`` or ``"none"`` (the paper's form).
        eps: floor of each norm, so a zero vector gives a finite output.
        strip_norms: ``False`` keeps BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm;
            ``"drop"`` removes them; ``"fold"`` removes them but keeps their learned scale and
            shift, folded into the cosine layer they directly follow, else as an ``Affine``.
        include, exclude: fully-qualified-name globs (``"fc"``, ``"layer4.*"``) or module types;
            functional calls are named ``module.path.node_name``.
    """

    centered: bool = False
    gain: str = "channel"
    eps: float = 1e-6
    strip_norms: bool | str = False
    include: tuple[str | type, ...] | None = None
    exclude: tuple[str | type, ...] | None = None

    def __post_init__(self) -> None:
        if self.gain not in GAINS:
            raise ValueError(f"gain must be one of {GAINS}, got {self.gain!r}")
        if self.strip_norms not in STRIP_MODES:
            raise ValueError(f"strip_norms must be one of {STRIP_MODES}, got {self.strip_norms!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, (str, type)):
                patterns = [patterns]
            if patterns is not None:
                object.__setattr__(self, name, tuple(patterns))

    @property
    def layer(self) -> dict:
        """The keyword arguments of one cosine layer (``CosineLinear(..., **config.layer)``)."""
        return {"centered": self.centered, "gain": self.gain, "eps": self.eps}

    def replace(self, **changes) -> CosineConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data (a module type as ``"module:QualName"``), for reports, recipe files and ONNX metadata."""
        return {
            "centered": self.centered, "strip_norms": self.strip_norms, "gain": self.gain, "eps": self.eps,
            "include": _names(self.include), "exclude": _names(self.exclude),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, settings: dict) -> CosineConfig:
        """The config :meth:`to_dict` wrote; ``"module:QualName"`` patterns are imported back as types."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown conversion settings {sorted(unknown)}; known: {sorted(known)}")
        settings = dict(settings)
        for name in ("include", "exclude"):
            if settings.get(name) is not None:
                settings[name] = [_type(p) if ":" in p else p for p in settings[name]]
        return cls(**settings)


def _names(patterns: Sequence[str | type] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in patterns]


def _type(name: str) -> type:
    module, _, qualname = name.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
