"""The judge of faithful conversion (issue 10): the original model, run with every dot-product layer
call replaced by a float64 cosine of the operands that call actually receives.

:class:`CosineReference` is a ``TorchFunctionMode``. Under it, every ``F.linear`` and
``F.conv1d/2d/3d`` call (``torch.conv2d`` is the same function), and every ``torch.addmm``
whose matrix operand is a weight ``Parameter`` (transformers' ``Conv1D``:
``addmm(bias, x, W)``, ``W`` of shape (in, out)), returns the cosine of the operands it got:
after the layer's own padding (``Conv2dSame`` pads in its forward, then calls ``F.conv2d``),
weight standardization (``StdConv2d`` hands ``F.conv2d`` the standardized weight) or any other
transform in its forward. The cosine is ``tests/reference.py``'s unfold-based one (gain none,
norms floored at ``eps``), taken in float64. Products between activations (attention's q·k,
``scaled_dot_product_attention``) run as they are.

A product of an activation with a weight (``matmul``/``mm``/``bmm``/``@``, a two-operand ``einsum``,
grouped experts' ``_grouped_mm``) is a linear layer too: its cosine is the product itself over the
norms of the two vectors each output contracts, and those norms are the same product taken of the
squared operand against ones, ``einsum(eq, a*a, 1)`` and ``einsum(eq, 1, b*b)``; no parsing of which
dimensions are contracted, and grouped experts are taken one expert at a time.

``F.multi_head_attention_forward`` hides its ``F.linear`` calls from a mode (the mode is off
while it handles the call), so the mode runs a copy of it with its torch-function guard
removed and itself active again, and sees the projections inside.

Nothing of cosconvert is used here.
"""

from __future__ import annotations

import copy
import functools
import types
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from reference import cosine_reference, linear_reference
from torch import nn
from torch.overrides import TorchFunctionMode

CONVS = {F.conv1d, F.conv2d, F.conv3d}  # F.convNd is torch.convNd
CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# Products that may hide a weight: watched, not replaced, so a layer computed another way shows up.
PRODUCTS = {torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.baddbmm, torch.Tensor.__matmul__, torch.addmm}
MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm}
GROUPED = {torch._grouped_mm, *([F.grouped_mm] if hasattr(F, "grouped_mm") else [])}


def _product_cosine(product, a, b, eps):
    """``product(a, b)`` with each output over the norms of the two vectors it contracts (float64)."""
    a, b = a.double(), b.double()
    num = product(a, b)
    norm_a = product(a * a, torch.ones_like(b)).sqrt().clamp_min(eps)
    norm_b = product(torch.ones_like(a), b * b).sqrt().clamp_min(eps)
    return num / (norm_a * norm_b)


def _grouped_cosine(a, b, offs, eps):
    """Grouped experts, one at a time: rows ``offs[e-1]:offs[e]`` of ``a`` against ``b[e]`` (``a (T, K)``, ``b (E, K, N)``)."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(_product_cosine(torch.matmul, a[start:end], b[e], eps))
        start = end
    return torch.cat(out)


def _is_weight(t) -> bool:
    return isinstance(t, nn.Parameter) or (isinstance(t, torch.Tensor) and isinstance(t._base, nn.Parameter))


@functools.cache
def _unguarded(fn: types.FunctionType) -> types.FunctionType:
    """A copy of a torch Python function whose ``has_torch_function`` guard is always false, so the
    calls it makes inside reach the active mode."""
    scope = {**fn.__globals__, "has_torch_function": lambda *_: False}
    copy_ = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy_.__kwdefaults__ = fn.__kwdefaults__
    return copy_


SEE_INSIDE = {F.multi_head_attention_forward}


class CosineReference(TorchFunctionMode):
    """Replaces dot-product layer calls with their float64 cosine while active.

    ``calls`` counts the replaced calls by function; ``weight_products`` lists the products with a
    weight operand that were left alone (a linear layer computed in a way this judge does not know).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.plain_depth = 0  # > 0 inside a module left as dot products (see reference_outputs' skip)
        self.calls: Counter[str] = Counter()
        self.weight_products: list[str] = []

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.plain_depth:
            return func(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func in CONVS:
            return self._conv(func, args, kwargs)
        if func is torch.addmm and len(args) >= 3 and _is_weight(args[2]):
            return self._addmm(*args, **kwargs)
        if func in SEE_INSIDE:
            with self:
                return _unguarded(func)(*args, **kwargs)
        weights = [_is_weight(a) for a in args if isinstance(a, torch.Tensor)]
        if func in MATMULS and not kwargs and len(args) == 2 and weights.count(True) == 1:
            self.calls["matmul"] += 1
            return _product_cosine(torch.matmul, *args, self.eps).to(args[0].dtype)
        if func is torch.einsum and len(args) == 3 and weights.count(True) == 1:
            self.calls["einsum"] += 1
            return _product_cosine(functools.partial(torch.einsum, args[0]), *args[1:], self.eps).to(args[1].dtype)
        if func in (torch.baddbmm, torch.Tensor.baddbmm) and len(args) == 3 and [_is_weight(a) for a in args[1:]].count(True) == 1:
            self.calls["baddbmm"] += 1
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            out = alpha * _product_cosine(torch.matmul, args[1], args[2], self.eps) + beta * args[0].double()
            return out.to(args[1].dtype)
        if func in GROUPED and weights.count(True) == 1:
            self.calls["grouped_mm"] += 1
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            return _grouped_cosine(args[0], args[1], offs, self.eps).to(args[0].dtype)
        if func in PRODUCTS and any(_is_weight(a) for a in args):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            self.weight_products.append(f"{getattr(func, '__name__', func)}{shapes}")
        return func(*args, **kwargs)

    def _linear(self, input, weight, bias=None):
        self.calls["linear"] += 1
        return linear_reference(input, weight, bias, eps=self.eps).to(input.dtype)

    def _conv(self, func, args, kwargs):
        self.calls[func.__name__] += 1
        a = {**dict(zip(CONV_ARGS, args)), **kwargs}
        x, w = a["input"], a["weight"]
        unbatched = x.dim() == w.dim() - 1
        x = x.unsqueeze(0) if unbatched else x
        out = cosine_reference(
            x, w, a.get("bias"), a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1),
            eps=self.eps,
        )  # fmt: skip
        return (out.squeeze(0) if unbatched else out).to(x.dtype)

    def _addmm(self, input, mat1, mat2, *, beta=1, alpha=1):
        if beta != 1 or alpha != 1:
            raise NotImplementedError(f"addmm with beta={beta}, alpha={alpha} is not a linear layer")
        self.calls["addmm"] += 1
        return linear_reference(mat1, mat2.t(), input, eps=self.eps).to(mat1.dtype)


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def leave_plain(module: nn.Module, mode: CosineReference) -> None:
    """Hooks that pause ``mode``'s replacing while ``module`` runs."""

    def enter(*_):
        mode.plain_depth += 1

    def leave(*_):
        mode.plain_depth -= 1

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


@torch.no_grad()
def reference_outputs(model: nn.Module, *args, skip: Iterable[str] = (), **kwargs):
    """(output, the mode) of a float64 copy of ``model`` run under :class:`CosineReference`, in eval mode
    with the transformer fast paths off. Floating inputs are cast to float64; ``model`` is not changed.

    ``skip``: names of submodules whose calls stay dot products (layers a conversion reports as skipped).
    """
    twin = copy.deepcopy(model).double().eval()
    args = [_double(a) for a in args]
    kwargs = {k: _double(v) for k, v in kwargs.items()}
    mode = CosineReference()
    for name in skip:
        leave_plain(twin.get_submodule(name), mode)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with mode:
            out = twin(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return out, mode
