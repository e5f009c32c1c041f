"""Cosine normalization for code that fx cannot see into.

:class:`CosineCalls` is a ``TorchFunctionMode`` that runs every ``F.linear`` /
``F.convNd`` call made while it is active as its cosine twin. The converter uses it
around the few places a graph pass cannot rewrite: functions that fx records as
opaque leaves (``torch.fx.wrap``) and submodules whose forward cannot be traced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cosconvert import functional as CF

# Every spelling of a dot-product layer that Python code can call, and its cosine twin.
TWINS: dict[Callable, Callable] = {
    F.linear: CF.cosine_linear,  # is torch._C._nn.linear
    F.conv1d: CF.cosine_conv1d,  # is torch.conv1d
    F.conv2d: CF.cosine_conv2d,
    F.conv3d: CF.cosine_conv3d,
    # ATen spellings, as in the graphs of torch.export programs (.pt2)
    torch.ops.aten.linear.default: CF.cosine_linear,
    torch.ops.aten.conv1d.default: CF.cosine_conv1d,
    torch.ops.aten.conv2d.default: CF.cosine_conv2d,
    torch.ops.aten.conv3d.default: CF.cosine_conv3d,
}


class CosineCalls(TorchFunctionMode):
    """Redirects linear and conv calls to their cosine twins while active.

    ``gains`` pairs weights with the gain to use for them (a weight not listed gets none);
    a slice of a listed weight (as ``nn.MultiheadAttention`` takes of ``in_proj_weight``)
    gets the matching slice of its gain.
    """

    def __init__(self, centered: bool = False, eps: float = 1e-6, gains: Iterable[tuple[Tensor, Tensor]] = ()):
        super().__init__()
        self.centered, self.eps = centered, eps
        self.gains = {id(w): g for w, g in gains if g is not None}

    def _gain(self, weight: Tensor) -> Tensor | None:
        gain = self.gains.get(id(weight))
        base = weight._base
        if gain is None and base is not None and id(base) in self.gains:
            gain = self.gains[id(base)]
            if gain.numel() > 1:
                first = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                gain = gain[first : first + weight.shape[0]]
        return gain

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        twin = TWINS.get(func)
        if twin is None or CF.in_cosine_math():  # the cosine math's own calls stay plain
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        return twin(*args, **kwargs, centered=self.centered, eps=self.eps, gain=self._gain(weight))


def gains_of(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(weight, gain) of every cosine layer inside ``module``."""
    return [(m.weight, m.gain) for m in module.modules() if hasattr(m, "gain") and hasattr(m, "weight")]


def scoped_function(fn: Callable, centered: bool, eps: float) -> Callable:
    """``fn`` run under :class:`CosineCalls`; the graph passes it the (weight, gain) pairs first."""

    @functools.wraps(fn)
    def scoped(gains, *args, **kwargs):
        with CosineCalls(centered, eps, gains):
            return fn(*args, **kwargs)

    scoped.__module__ = __name__  # so fx stores the function object instead of importing fn's name
    return scoped


@functools.cache
def scoped_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward runs under :class:`CosineCalls`, with the fast
    paths of ``nn.MultiheadAttention`` and the transformer layers switched off."""

    @functools.wraps(cls.forward)  # keeps the signature, which torch.export reads
    def forward(self, *args, **kwargs):
        centered, eps = self._cosine_settings
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with CosineCalls(centered, eps, gains_of(self)):
                return cls.forward(self, *args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "_cosine_scoped": True})
