"""Cosine normalization for code that fx cannot see into, and the run-time check of it.

:class:`CosineCalls` is a ``TorchFunctionMode`` that runs every dot-product layer call made
while it is active (``F.linear``, ``F.convNd``, ``torch.addmm`` with a weight ``Parameter``
as its matrix, as transformers' ``Conv1D`` computes a linear layer, and a product of an
activation with a weight: ``x @ W.T``, ``einsum``, grouped experts' ``_grouped_mm``) as its
cosine twin; inside ``F.multi_head_attention_forward`` too, whose projections it sees. The
converter uses it around the few places a graph pass cannot rewrite: functions that fx records
as opaque leaves (``torch.fx.wrap``) and modules whose forward cannot be traced faithfully. :class:`DotProductCalls` watches a run and records which layer
calls ran plain and which :class:`CosineCalls` turned into cosines.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cosconvert import functional as CF
from cosconvert.config import CosineConfig
from cosconvert.nn import _CosineMixin

ADDMM = (torch.addmm, torch.ops.aten.addmm.default)


def cosine_addmm(
    input: Tensor, mat1: Tensor, mat2: Tensor, *, centered: bool = False, eps: float = 1e-6, gain: Tensor | None = None
) -> Tensor:
    """``addmm(bias, x, W)`` as a linear layer (transformers' ``Conv1D``, ``W`` of shape (in, out)):
    ``x (N, in)`` -> ``(N, out)``, each output ``gain * cos(W[:, j], x) + bias_j``."""
    return CF.cosine_linear(mat1, mat2.t(), input, centered=centered, eps=eps, gain=gain)


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


# Products that are a linear layer when one operand is a weight (a Parameter or a view of one).
MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, operator.matmul, torch.mm, torch.Tensor.mm,
           torch.bmm, torch.Tensor.bmm}  # fmt: skip
GROUPED_MMS = {torch._grouped_mm, *([F.grouped_mm] if hasattr(F, "grouped_mm") else [])}
BADDBMMS = {torch.baddbmm, torch.Tensor.baddbmm}  # beta * input + alpha * (batch1 @ batch2)
PRODUCTS = MATMULS | GROUPED_MMS | BADDBMMS | {torch.einsum}


@dataclasses.dataclass
class Product:
    """A product call with exactly one weight operand: its cosine twin, called as
    ``twin(*args, **kwargs, weight=weight, centered=..., eps=..., gain=...)``."""

    twin: Callable
    args: tuple
    kwargs: dict
    weight: int  # which operand (0 or 1) is the weight
    operand: Tensor | None  # the weight operand itself (at run time)


def product(func, args: tuple, kwargs: dict, weighted: Callable = None) -> Product | None:
    """``func(*args, **kwargs)`` as a :class:`Product`, where it is a matmul, baddbmm, einsum or grouped product
    of two operands exactly one of which is ``weighted`` (default :func:`is_weight`); else None."""
    weighted = weighted or is_weight
    if func in MATMULS and len(args) == 2 and not kwargs:
        twin, operands, extra = CF.cosine_matmul, tuple(args), {}
    elif func is torch.einsum and len(args) >= 2 and not kwargs:
        operands = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else tuple(args[1:])
        twin, extra = functools.partial(CF.cosine_einsum, args[0]), {}
    elif func in BADDBMMS and len(args) == 3 and set(kwargs) <= {"beta", "alpha"}:
        twin, operands, extra = CF.cosine_baddbmm, tuple(args[1:]), {"input": args[0], **kwargs}
    elif func in GROUPED_MMS and len(args) >= 2:
        twin, operands, extra = (
            CF.cosine_grouped_mm,
            tuple(args[:2]),
            {**dict(zip(("offs", "bias", "out_dtype"), args[2:])), **kwargs},
        )
    else:
        return None
    if len(operands) != 2:
        return None
    flags = [bool(weighted(t)) for t in operands]
    if flags.count(True) != 1:
        return None
    if func is torch.einsum and CF.contracted_dims(args[0], [_rank(t) for t in operands]) is None:
        return None
    index = flags.index(True)
    return Product(twin, operands, extra, index, operands[index] if isinstance(operands[index], Tensor) else None)


def _rank(t) -> int:
    return t.dim() if isinstance(t, Tensor) else -1  # a graph node: unknown


def is_weight(t) -> bool:
    """A ``Parameter``, or a view of one (a slice, a transpose)."""
    return isinstance(t, nn.Parameter) or (isinstance(t, Tensor) and isinstance(t._base, nn.Parameter))


def layer_weight(func, args: tuple, kwargs: dict) -> Tensor | None:
    """The weight operand of a dot-product layer call (the matrix of a linear ``addmm``), else None."""
    if func in TWINS:
        return args[1] if len(args) > 1 else kwargs.get("weight")
    if func in ADDMM and len(args) >= 3 and is_weight(args[2]) and kwargs.get("beta", 1) == kwargs.get("alpha", 1) == 1:
        return args[2]
    return None


_plain_depth = 0  # > 0 while a layer call is deliberately left plain (excluded): no CosineCalls takes it


@contextmanager
def leave_plain() -> Iterator[None]:
    """The layer calls made inside stay dot products, whatever :class:`CosineCalls` is active."""
    global _plain_depth
    _plain_depth += 1
    try:
        yield
    finally:
        _plain_depth -= 1


def plain_function(fn: Callable) -> Callable:
    """``fn`` run under :func:`leave_plain` (an excluded functional call inside a fallback)."""

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        with leave_plain():
            return fn(*args, **kwargs)

    plain.__module__ = __name__
    return plain


_watchers: list[DotProductCalls] = []


class CosineCalls(TorchFunctionMode):
    """Redirects dot-product layer calls to their cosine twins while active.

    ``gains`` pairs weights with the gain to use for them (a weight not listed gets
    ``layer_gain``, else none); a slice of a listed weight (as ``nn.MultiheadAttention``
    takes of ``in_proj_weight``) gets the matching slice of its gain. Calls on a weight in
    ``plain`` (excluded layers) stay dot products.
    """

    def __init__(
        self,
        config: CosineConfig | None = None,
        gains: Iterable[tuple[Tensor, Tensor]] = (),
        plain: Iterable[Tensor] = (),
        layer_gain: Tensor | None = None,
    ):
        super().__init__()
        config = config or CosineConfig()
        self.centered, self.eps, self.layer_gain = config.centered, config.eps, layer_gain
        self.gains = {id(w): g for w, g in gains if g is not None}
        self.plain = {id(w) for w in plain}

    def _gain(self, weight: Tensor) -> Tensor | None:
        gain = self.gains.get(id(weight))
        base = weight._base
        if gain is None and base is not None and id(base) in self.gains:
            gain = self.gains[id(base)]
            if gain.numel() > 1:
                first = (weight.storage_offset() - base.storage_offset()) // base.stride(0)
                gain = gain[first : first + weight.shape[0]]
        return self.layer_gain if gain is None else gain

    def _left_plain(self, weight: Tensor | None) -> bool:
        return weight is not None and (
            id(weight) in self.plain or (weight._base is not None and id(weight._base) in self.plain)
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SEE_INSIDE:
            with self:
                return _unguarded(func)(*args, **kwargs)
        weight = None if _plain_depth or CF.in_cosine_math() else layer_weight(func, args, kwargs)
        if weight is None and not (_plain_depth or CF.in_cosine_math()):
            found = product(func, args, kwargs)
            if found is not None and not self._left_plain(found.operand):
                for watcher in _watchers:
                    watcher.cosine(func, found.operand)
                gain = self._gain(found.operand)
                gain = gain if gain is not None and gain.numel() == 1 else None  # a unit's gain has no layout here
                return found.twin(*found.args, **found.kwargs, weight=found.weight, centered=self.centered,
                                  eps=self.eps, gain=gain)  # fmt: skip
        if weight is None:  # not a layer call, the cosine math's own calls, or one left plain on purpose
            return func(*args, **kwargs)
        if self._left_plain(weight):
            with leave_plain():
                return func(*args, **kwargs)
        for watcher in _watchers:
            watcher.cosine(func, weight)
        if func in ADDMM:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("beta", "alpha")}
            return cosine_addmm(*args, **kwargs, centered=self.centered, eps=self.eps, gain=self._gain(weight))
        return TWINS[func](*args, **kwargs, centered=self.centered, eps=self.eps, gain=self._gain(weight))


class DotProductCalls(TorchFunctionMode):
    """Records, during a run, the layer calls that ran as plain dot products (``plain``) and
    those :class:`CosineCalls` ran as cosines (``cosine_calls``): lists of (function name, weight).
    Layers converted in a graph or as cosine modules make neither kind of call."""

    def __init__(self) -> None:
        super().__init__()
        self.plain: list[tuple[str, Tensor]] = []
        self.cosine_calls: list[tuple[str, Tensor]] = []

    def __enter__(self):
        _watchers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _watchers.remove(self)
        return super().__exit__(*exc)

    def cosine(self, func, weight: Tensor) -> None:
        self._record(self.cosine_calls, _name(func), weight)

    def _record(self, calls: list, func: str, weight: Tensor) -> None:
        calls.append((func, weight))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SEE_INSIDE:
            with self:
                return _unguarded(func)(*args, **kwargs)
        weight = None if CF.in_cosine_math() else layer_weight(func, args, kwargs)
        if weight is None and not CF.in_cosine_math():
            found = product(func, args, kwargs)
            weight = None if found is None else found.operand
        if weight is not None:
            self._record(self.plain, _name(func), weight)
        return func(*args, **kwargs)


def _name(func) -> str:
    return "addmm" if func in ADDMM else getattr(func, "__name__", str(func)).split(".")[0]


@functools.cache
def _unguarded(fn: types.FunctionType) -> types.FunctionType:
    """A copy of a torch Python function whose ``has_torch_function`` guard is always false, so the
    calls it makes inside reach the active mode (which is off while it handles ``fn`` itself)."""
    scope = {**fn.__globals__, "has_torch_function": lambda *_: False}
    copy_ = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy_.__kwdefaults__ = fn.__kwdefaults__
    return copy_


# Torch functions that make their layer calls inside (nn.MultiheadAttention's functional form,
# which transformers' WavLM calls with its own projection weights).
SEE_INSIDE = {F.multi_head_attention_forward}


def gains_of(module: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(weight, gain) of every cosine layer inside ``module``."""
    return [(m.weight, m.gain) for m in module.modules() if isinstance(m, _CosineMixin) and hasattr(m, "weight")]


def scoped_function(fn: Callable, config: CosineConfig) -> Callable:
    """``fn`` run under :class:`CosineCalls`; the graph passes it the (weight, gain) pairs first."""

    @functools.wraps(fn)
    def scoped(gains, *args, **kwargs):
        with CosineCalls(config, gains):
            return fn(*args, **kwargs)

    scoped.__module__ = __name__  # so fx stores the function object instead of importing fn's name
    return scoped


@functools.cache
def scoped_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward runs under :class:`CosineCalls`, with the fast
    paths of ``nn.MultiheadAttention`` and the transformer layers switched off.

    Its state is declared on the class: ``cosine_config``, ``cosine_plain`` (names of the
    parameters whose calls stay plain) and, for a layer, the parameter ``cosine_gain`` (its
    calls' gain)."""

    @functools.wraps(cls.forward)  # keeps the signature, which torch.export reads
    def forward(self, *args, **kwargs):
        plain = [self.get_parameter(name) for name in self.cosine_plain]
        layer_gain = self._parameters.get("cosine_gain")
        mha = torch.backends.mha  # its flag set directly: torch.compile traces that, not set_fastpath_enabled
        fastpath, mha._is_fastpath_enabled = mha._is_fastpath_enabled, False
        try:
            with CosineCalls(self.cosine_config, gains_of(self), plain, layer_gain):
                return cls.forward(self, *args, **kwargs)
        finally:
            mha._is_fastpath_enabled = fastpath

    namespace = {"forward": forward, "__module__": cls.__module__, "_cosine_scoped": True,
                 "cosine_config": CosineConfig(), "cosine_plain": ()}  # fmt: skip
    return type(cls.__name__, (cls,), namespace)


@functools.cache
def plain_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose layer calls stay dot products under any :class:`CosineCalls`
    (an excluded layer with its own forward, inside a fallback)."""

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        with leave_plain():
            return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "_cosine_scoped": True})
