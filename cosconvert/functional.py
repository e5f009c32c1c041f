"""The math of cosine normalization, in one place.

Luo et al., "Cosine Normalization: Using Cosine Similarity Instead of Dot Product in
Neural Networks" (2017). A unit's pre-activation ``w . x`` becomes

    cos(w, x) = w . x / (max(|w|, eps) * max(|x|, eps))

and, with ``centered=True``, the Pearson correlation: ``w`` and ``x`` each minus its
mean. ``x`` is the unit's receptive field: for a convolution, all input channels of the
filter's group times the kernel window, zero padding counted as zeros.

The receptive field is never unfolded. Because a centered weight sums to zero,
``w_c . x = w_c . x_c``, so one ordinary convolution with the normalized weight gives
every numerator; the norms ``|x|^2 = S2`` and ``|x_c|^2 = S2 - S1^2 / n`` come from
window sums of the channel-summed squares ``S2`` (and sums ``S1``). Norms are computed
in float32 under float16/bfloat16 and autocast. An uncentered float32/float64 layer runs the
convolution on its raw weight instead and scales each output unit by ``1/|w|`` along with ``1/|x|``:
the same cosine, without writing a normalized copy of the weight on every call.

A zero field gives 0. A constant field gives 0 in the centered form too: a field whose
centered energy is below ``CONSTANT_TOL`` of its raw energy (standard deviation under
about 0.3% of its RMS value) is treated as constant, because float32 sums cannot
resolve it and the quotient would be rounding noise.

The centered energy ``S2 - S1^2 / n`` cancels badly when a field's mean dwarfs its spread.
So each position's channels are first shifted by their own float32 mean ``m``: the float32
sums ``q = sum (x - m)^2`` and ``r = sum (x - m)`` lose nothing to the mean, and only these
per-position sums (one value per position, not per channel) go to float64, where

    S2 - S1^2 / n = window_sum(v) + (window_sum(u^2) - window_sum(u)^2 / k) / c,
    v = q - r^2 / c,   u = c m + r   (c channels in a group, k window positions, n = c k)

is exact for the float32 inputs. A depthwise field has one channel, so there is nothing to
shift and its sums are taken in float64 directly.

Under ``torch.compile`` the math traces whole, with no graph break: the sums of squares are plain
expressions there, which inductor fuses into the kernels around them, in place of the eager
path's cache-sized pieces and hand-written backward; and a window sum of at most 25 taps a side is a
sum pool (on the CPU over the input padded first), which inductor fuses too, where eager takes a
grouped convolution with a kernel of ones.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LayerCall",
    "ProductCall",
    "observing",
    "cosine_linear",
    "cosine_conv1d",
    "cosine_conv2d",
    "cosine_conv3d",
    "normalize_weight",
    "weight_inverse_norm",
    "inverse_norm",
    "centered_inverse_norm",
    "receptive_field_inverse_norm",
]

CONSTANT_TOL = 1e-5
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_SUM_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}  # with divisor_override=1: a window sum
_POOL_LOWERED = 25  # inductor lowers pools of at most this many taps to loops it fuses
_IntOrTuple = int | Sequence[int]


_IN_COSINE_MATH = contextvars.ContextVar("cosconvert_in_cosine_math", default=False)  # eager: per thread
_compiled_depth = 0  # under torch.compile: dynamo traces a module global's changes, not a ContextVar's


class _CosineMath:
    """Marks the plain conv/linear calls the cosine math makes itself, so that
    :class:`cosconvert.calls.CosineCalls` (which turns plain calls into cosine ones) leaves them alone."""

    def __enter__(self) -> None:
        global _compiled_depth
        if torch.compiler.is_compiling():
            _compiled_depth += 1
        else:
            self._token = _IN_COSINE_MATH.set(True)

    def __exit__(self, *exc) -> None:
        global _compiled_depth
        if torch.compiler.is_compiling():
            _compiled_depth -= 1
        else:
            _IN_COSINE_MATH.reset(self._token)


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing (then each layer becomes one ``cosconvert`` op). Reads
    the flag behind ``torch.compiler.is_exporting()``: dynamo in torch 2.11 (at least) folds that call
    to True under plain ``torch.compile`` too, which sent compiled training into ops with no backward."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


def in_cosine_math() -> bool:
    """True inside the cosine math's own conv/linear calls."""
    return _compiled_depth > 0 if torch.compiler.is_compiling() else _IN_COSINE_MATH.get()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type norms are summed in: float32 for the half types, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def inverse_norm(sum_sq: Tensor, eps: float) -> Tensor:
    """``1 / max(|x|, eps)`` from a vector's sum of squares ``|x|^2``."""
    return sum_sq.clamp_min(eps * eps).rsqrt_()  # in place on clamp_min's fresh output


def centered_inverse_norm(energy: Tensor, sum_sq: Tensor, eps: float) -> Tensor:
    """``1 / max(|x - mean x|, eps)`` from a vector's centered energy ``|x - mean x|^2`` and its
    raw ``|x|^2``; 0 where the vector is constant (energy under ``CONSTANT_TOL`` of the raw)."""
    return torch.where(energy > CONSTANT_TOL * sum_sq, energy.clamp_min(eps * eps).rsqrt(), 0.0)


def shifted_sums(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(v, u)`` of the module docstring for the vectors along ``dim`` of ``x``, in float64 with
    ``dim`` reduced: ``u`` is each vector's sum, ``v`` its centered energy, both from float32
    sums of the deviations from the vector's own float32 mean, which keep float32's accuracy."""
    c = x.shape[dim]
    m = x.mean(dim, keepdim=True)  # any float32 shift is exact below; the mean makes deviations small
    q = r = 0.0
    for piece in _cache_sized(x, dim):
        d = piece - m
        r = r + d.sum(dim)
        if d.requires_grad and torch.is_grad_enabled():
            q = q + sum_of_squares(d, dim)
        else:  # square in place: no second temporary
            q = q + d.square_().sum(dim)
    q, r = q.double(), r.double()
    return q - r * r / c, m.squeeze(dim).double() * c + r


def normalize_weight(
    weight: Tensor, *, centered: bool = False, eps: float = 1e-6, gain: Tensor | None = None
) -> Tensor:
    """Each output unit's weight (row of ``weight``, shape ``(out, ...)``) over its norm,
    centered first if asked, times ``gain`` (shape ``()``, ``(1,)`` or ``(out,)``).
    Computed in float32 for half types and returned in ``weight.dtype``."""
    rows, scale = _rows_and_scale(weight, centered, eps, gain)
    return (rows * scale[:, None]).view_as(weight).to(weight.dtype)


def weight_inverse_norm(weight: Tensor, *, eps: float = 1e-6, gain: Tensor | None = None) -> Tensor:
    """``gain / max(|w_j|, eps)`` for each output unit's row ``w_j`` of ``weight`` ``(out, ...)``:
    shape ``(out,)``, float32 for half types."""
    return _rows_and_scale(weight, False, eps, gain)[1]


def _rows_and_scale(weight: Tensor, centered: bool, eps: float, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    """``weight``'s rows ``(out, n)`` in the norm type (centered if asked) and ``gain`` over their norms ``(out,)``."""
    w = weight.to(_norm_dtype(weight.dtype)).flatten(1)
    if centered:  # center first, so the norm is a plain sum of squares that cannot cancel
        raw_sq = w.square().sum(1)
        w = w - w.mean(1, keepdim=True)
        scale = centered_inverse_norm(w.square().sum(1), raw_sq, eps)
    else:
        scale = inverse_norm(w.square().sum(1), eps)
    return w, scale if gain is None else scale * gain.to(scale.dtype)


def _prepared_weight(weight: Tensor, centered: bool, eps: float, gain: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """What a cosine layer hands :func:`conv_normalized` / :func:`linear_normalized`: the raw weight and its
    per-unit ``unit_scale`` where :func:`_scales_output` allows, else the normalized weight and ``None``."""
    if _scales_output(weight, centered):
        return weight, weight_inverse_norm(weight, eps=eps, gain=gain)
    return normalize_weight(weight, centered=centered, eps=eps, gain=gain), None


def _scales_output(weight: Tensor, centered: bool) -> bool:
    """Whether a cosine layer runs on its raw weight and scales each output unit by ``1 / |w_j|``,
    rather than normalizing the weight first. The same math, without writing a normalized copy of
    every weight on every call (the bulk of a compiled network's extra time at small batches).
    Not for the centered form (``w_c . x`` must stay ``w_c . x_c``, which a raw weight loses), nor
    for half types (a raw weight's products may overflow where a unit one's cannot), nor under
    export (whose op takes the normalized weight)."""
    return not centered and weight.dtype in (torch.float32, torch.float64) and not _exporting()


def _tuple(value: _IntOrTuple, dims: int) -> tuple[int, ...]:
    return (value,) * dims if isinstance(value, int) else tuple(value)


_CACHE_BYTES = 4 << 20  # what one pass over part of an input may write, so that it stays in cache


def _cache_sized(x: Tensor, dim: int) -> tuple[Tensor, ...]:
    """``x`` split along ``dim`` into pieces of about ``_CACHE_BYTES``. Elementwise temporaries (a
    square, a difference) of a large input leave the cache before they are summed; made a piece
    at a time they do not (about twice as fast for a 26 MB input here)."""
    if torch.compiler.is_compiling() or x.numel() == 0:  # inductor fuses the temporaries away; or nothing to split
        return (x,)
    step = max(1, _CACHE_BYTES * x.shape[dim] // (x.numel() * x.element_size()))
    return x.split(step, dim)


def _squares_summed(x: Tensor, dim: int) -> Tensor:
    """``(x * x).sum(dim)`` by ``vecdot``, a cache-sized piece at a time."""
    pieces = _cache_sized(x, dim)
    total = torch.linalg.vecdot(pieces[0], pieces[0], dim=dim)
    for piece in pieces[1:]:
        total += torch.linalg.vecdot(piece, piece, dim=dim)
    return total


class _SumOfSquares(torch.autograd.Function):
    """``(x * x).sum(dim)`` by ``vecdot``, with a one-pass backward ``2 x g``. Autograd's own
    backward of ``vecdot(x, x)`` takes three passes over ``x``, the cost that dominated a 1x1
    cosine conv's training step."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.dim = dim
        return _squares_summed(x, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return x * (2 * grad).unsqueeze(ctx.dim), None


def sum_of_squares(x: Tensor, dim: int) -> Tensor:
    """``(x * x).sum(dim)``, with a one-pass backward where autograd is watching. Compiled, the plain
    expression: inductor fuses it into one pass (and its backward into the kernels around it)."""
    if torch.compiler.is_compiling():
        return (x * x).sum(dim)
    return _SumOfSquares.apply(x, dim) if torch.is_grad_enabled() and x.requires_grad else _squares_summed(x, dim)


def _poolable(kernel_size: Sequence[int], padding: str | _IntOrTuple, dilation: _IntOrTuple, padded: bool) -> bool:
    """Whether a sum pool computes this window sum: 2d or 3d, integer padding, no dilation, and few
    enough taps along each axis for inductor to lower it (see :func:`_sum_pool`). Unless the input is
    ``padded`` first, the pool pads it, at most half the kernel (a pool's limit)."""
    dims = len(kernel_size)
    if dims not in _SUM_POOL or isinstance(padding, str) or max(kernel_size) > _POOL_LOWERED:
        return False
    pads_fit = padded or all(2 * p <= k for p, k in zip(_tuple(padding, dims), kernel_size))
    return pads_fit and all(d == 1 for d in _tuple(dilation, dims))


def _sum_pool(x: Tensor, kernel_size: Sequence[int], stride: _IntOrTuple, padding: _IntOrTuple) -> Tensor:
    """Window sums of ``x`` ``(N, C, *spatial)`` by sum pooling (zeros padded in). A window of more
    taps than inductor lowers is summed one axis at a time, since a box is separable: a 7x7 stem's
    window is two 7-tap loops instead of a 49-tap one-channel convolution, which took longer here
    than the stem's own convolution."""
    dims, pool = len(kernel_size), _SUM_POOL[len(kernel_size)]
    if math.prod(kernel_size) <= _POOL_LOWERED:
        return pool(x, kernel_size, stride, padding, count_include_pad=True, divisor_override=1)
    strides, pads = _tuple(stride, dims), _tuple(padding, dims)
    for axis in range(dims):
        one_axis = [[v if i == axis else rest for i, v in enumerate(values)]
                    for values, rest in ((kernel_size, 1), (strides, 1), (pads, 0))]  # fmt: skip
        x = pool(x, *one_axis, count_include_pad=True, divisor_override=1)
    return x


def receptive_field_inverse_norm(
    input: Tensor,
    kernel_size: Sequence[int],
    stride: _IntOrTuple = 1,
    padding: str | _IntOrTuple = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    centered: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """``1 / |x|`` for every receptive field of a convolution over ``input``
    ``(N, C, *spatial)``: shape ``(N, groups, *out_spatial)``, float32 for half inputs."""
    dims = len(kernel_size)
    n, c = input.shape[:2]
    per_group, k = c // groups, math.prod(kernel_size)
    pointwise = k == 1 and (padding in ("valid", "same") or all(p == 0 for p in _tuple(padding, dims)))
    # Compiled, a small pool is a loop fused with the norm around it; the conv of ones an external call.
    # On the CPU the input is padded first (below), so the pool pads nothing; not for a window summed
    # one axis at a time (see _sum_pool), which that made slower.
    pad_first = input.device.type == "cpu" and k <= _POOL_LOWERED
    pooled = torch.compiler.is_compiling() and not pointwise and _poolable(kernel_size, padding, dilation, pad_first)

    def window_sums(*sums: Tensor) -> list[Tensor]:
        """Each per-position tensor (N, groups, *spatial) summed over every field's window."""
        if pointwise:
            return list(sums)
        stacked = torch.cat(sums, 1) if len(sums) > 1 else sums[0]
        if pooled:
            window = _sum_pool(stacked, kernel_size, stride, 0 if pad_first else padding)
        else:
            ones = stacked.new_ones(stacked.shape[1], 1, *kernel_size)
            with _CosineMath():
                window = _CONV[dims](stacked, ones, None, stride, padding, dilation, stacked.shape[1])
        return list(window.split(groups, 1))

    with torch.autocast(input.device.type, enabled=False):
        x = input.to(_norm_dtype(input.dtype))
        strides = _tuple(stride, dims)
        if pointwise and any(s != 1 for s in strides):  # 1x1 kernel: a field is one position, so subsample
            x = x[(..., *(slice(None, None, s) for s in strides))]  # (a no-op slice would cost a full-size backward)
        if pooled and pad_first and any(_tuple(padding, dims)):
            # Zeros padded in before the per-position sums, not by the pool: on the CPU inductor's pool
            # over padding reads masked taps, vector code that also slowed the weight copies it puts
            # in the same kernel (compiled resnet50: 1.19-1.21x its original so, 1.08-1.11x this way).
            # Not on CUDA, where this made compiled resnet18 slower (1.34-1.37x against 1.17-1.25x).
            x = F.pad(x, [p for p in reversed(_tuple(padding, dims)) for _ in range(2)])
        grouped = x.reshape(n, groups, per_group, *x.shape[2:])  # (N, groups, C/groups, *spatial)
        if not centered:
            sum_sq = x * x if per_group == 1 else sum_of_squares(grouped, 2)
            return inverse_norm(window_sums(sum_sq)[0], eps)
        if per_group == 1:  # depthwise: one channel per position, nothing to shift; sum in float64
            u = x.double()
            window_u, window_uu = window_sums(u, u * u)
            energy, raw = torch.addcmul(window_uu, window_u, window_u, value=-1 / k), window_uu
        else:
            v, u = shifted_sums(grouped, 2)
            window_u, window_uu, window_v = window_sums(u, u * u, v)
            energy = torch.addcmul(window_uu, window_u, window_u, value=-1 / k).div_(per_group).add_(window_v)
            raw = (window_uu / per_group).add_(window_v)
        return centered_inverse_norm(energy, raw, eps).to(_norm_dtype(input.dtype))


@dataclasses.dataclass
class LayerCall:
    """One cosine layer call, as :func:`observing` hands it to its observer: ``conv`` holds
    (stride, padding, dilation, groups) for a convolution and is None for a linear layer."""

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    gain: Tensor | None
    centered: bool
    eps: float
    conv: tuple | None = None

    @property
    def unit_dim(self) -> int:
        """The output axis of the units: the last for a linear layer, the channels for a convolution
        (0 for an unbatched input)."""
        if self.conv is None:
            return -1
        return 0 if self.input.dim() == self.weight.dim() - 1 else 1

    def dot_product(self, bias: Tensor | None) -> Tensor:
        """The plain layer this call replaced, ``w . x + bias``, left so by any CosineCalls."""
        with _CosineMath():
            if self.conv is None:
                return F.linear(self.input, self.weight, bias)
            return _CONV[self.weight.dim() - 2](self.input, self.weight, bias, *self.conv)

    def cosine(self, gain: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """The call's output with this gain and bias: by default its bare cosines."""
        if self.conv is None:
            return _cosine_linear(self.input, self.weight, bias, self.centered, self.eps, gain)
        return _cosine_conv_math(self.input, self.weight, bias, *self.conv, self.centered, self.eps, gain)


@dataclasses.dataclass
class ProductCall:
    """One cosine product of an activation with a weight (``einsum``, ``matmul``, grouped experts), as
    :func:`observing` hands it to its observer. Its ``gain`` (shaped like the weight operand, its
    contracted dimensions of size 1) scales each output unit; ``cosine(gain)`` and ``dot_product()``
    recompute the call."""

    weight: Tensor
    gain: Tensor | None
    cosine: Callable[[Tensor | None], Tensor]
    plain: Callable[[], Tensor]

    def dot_product(self) -> Tensor:
        """The plain product this call replaced, left so by any CosineCalls."""
        with _CosineMath():
            return self.plain()


_observer: Callable[[LayerCall | ProductCall], Tensor] | None = None


@contextmanager
def observing(observer: Callable[[LayerCall | ProductCall], Tensor]) -> Iterator[None]:
    """While active, every cosine layer call (a cosine module's, a rewritten graph's, or one that
    CosineCalls redirects) is handed to ``observer`` as a :class:`LayerCall`, and every cosine product
    with a weight as a :class:`ProductCall`; its return value becomes the call's output.
    Calibration fits each layer's gain this way, wherever the layer lives."""
    global _observer
    previous, _observer = _observer, observer
    try:
        yield
    finally:
        _observer = previous


def _observed() -> bool:
    return _observer is not None and not torch.compiler.is_compiling() and not _exporting()


def _cosine_conv(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain):
    if _observed():
        return _observer(LayerCall(input, weight, bias, gain, centered, eps, (stride, padding, dilation, groups)))
    return _cosine_conv_math(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain)


def _cosine_conv_math(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain):
    w, unit_scale = _prepared_weight(weight, centered, eps, gain)
    return conv_normalized(
        input, w, bias, stride, padding, dilation, groups, centered=centered, eps=eps, unit_scale=unit_scale
    )


def _explicit_padding(input: Tensor, weight: Tensor, padding, dilation) -> tuple[Tensor, list[int]]:
    """Symmetric integer padding for the export op; an odd 'same' pad is applied to ``input`` first."""
    dims = weight.dim() - 2
    if padding == "valid":
        return input, [0] * dims
    if padding != "same":
        return input, list(_tuple(padding, dims))
    totals = [d * (k - 1) for k, d in zip(weight.shape[2:], _tuple(dilation, dims))]
    if all(t % 2 == 0 for t in totals):
        return input, [t // 2 for t in totals]
    pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
    return F.pad(input, pads), [0] * dims


@torch.library.custom_op("cosconvert::conv_normalized", mutates_args=())
def _conv_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    centered: bool,
    eps: float,
) -> Tensor:
    return conv_normalized(input, weight, bias, stride, padding, dilation, groups, centered=centered, eps=eps)


@_conv_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, centered, eps):
    return _CONV[weight.dim() - 2](input, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op("cosconvert::linear_normalized", mutates_args=())
def _linear_op(input: Tensor, weight: Tensor, bias: Tensor, centered: bool, eps: float) -> Tensor:
    return linear_normalized(input, weight, bias, centered=centered, eps=eps)


@_linear_op.register_fake
def _(input, weight, bias, centered, eps):
    return F.linear(input, weight, bias)


def conv_normalized(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: str | _IntOrTuple = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    unit_scale: Tensor | None = None,
) -> Tensor:
    """The cosine convolution for a weight already through :func:`normalize_weight`:
    ``conv(x, w_hat) / |x| + bias``; or, given ``unit_scale`` (shape ``(out,)``, from
    :func:`weight_inverse_norm`), for the raw weight: ``conv(x, w) * unit_scale / |x| + bias``.
    Under ``torch.export`` it is one ``cosconvert::conv_normalized`` op, which ONNX export turns
    into one ``cosconvert.CosineConv`` node."""
    dims = weight.dim() - 2
    if input.dim() == dims + 1:  # unbatched (C, *spatial), which F.conv2d and its kin accept too
        args = (weight, bias, stride, padding, dilation, groups)
        return conv_normalized(input[None], *args, centered=centered, eps=eps, unit_scale=unit_scale)[0]
    if _exporting():
        weight = _fold_unit_scale(weight, unit_scale)
        input, pads = _explicit_padding(input, weight, padding, dilation)
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias
        stride, dilation = list(_tuple(stride, dims)), list(_tuple(dilation, dims))
        return torch.ops.cosconvert.conv_normalized(input, weight, bias, stride, pads, dilation, groups, centered, eps)
    with _CosineMath():
        out = _CONV[dims](input, weight, None, stride, padding, dilation, groups)
    inv = receptive_field_inverse_norm(
        input, weight.shape[2:], stride, padding, dilation, groups, centered=centered, eps=eps
    )
    n, c_out = out.shape[:2]
    grouped, scale = out.view(n, groups, c_out // groups, *out.shape[2:]), inv.unsqueeze(2)
    dtype = _out_dtype(input, weight)
    per_unit = [1] * dims
    bias = None if bias is None else bias.view(-1, *per_unit).to(dtype)
    unit_scale = None if unit_scale is None else unit_scale.view(-1, *per_unit).to(dtype)
    if not out.requires_grad and out.dtype == dtype:  # autograd is not watching: scale and shift in place
        grouped.mul_(scale)
        return _scale_shift(out, unit_scale, bias, out=out)
    return _scale_shift((grouped * scale).view_as(out).to(dtype), unit_scale, bias)


def _fold_unit_scale(weight: Tensor, unit_scale: Tensor | None) -> Tensor:
    """The weight with each output unit's ``unit_scale`` multiplied in: the export ops take one weight."""
    if unit_scale is None:
        return weight
    return weight * unit_scale.view(-1, *[1] * (weight.dim() - 1)).to(weight.dtype)


def _scale_shift(x: Tensor, scale: Tensor | None, shift: Tensor | None, **out: Tensor) -> Tensor:
    """``x * scale + shift`` in one pass, either one absent; ``out=`` (which may be ``x``) as in torch."""
    if scale is None:
        return x if shift is None else torch.add(x, shift, **out)
    return torch.mul(x, scale, **out) if shift is None else torch.addcmul(shift, x, scale, **out)


def _out_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(input.device.type):
        return torch.get_autocast_dtype(input.device.type)
    return torch.promote_types(input.dtype, weight.dtype)


def linear_normalized(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    unit_scale: Tensor | None = None,
) -> Tensor:
    """The cosine linear layer for a weight already through :func:`normalize_weight`, or for the raw
    weight given ``unit_scale`` (as in :func:`conv_normalized`); one ``cosconvert::linear_normalized``
    op under ``torch.export``."""
    if _exporting():
        weight = _fold_unit_scale(weight, unit_scale)
        bias = weight.new_zeros(weight.shape[0]) if bias is None else bias
        return torch.ops.cosconvert.linear_normalized(input, weight, bias, centered, eps)
    with _CosineMath():
        out = F.linear(input, weight)
    with torch.autocast(input.device.type, enabled=False):
        x = input.to(_norm_dtype(input.dtype))
        if centered:  # one field: its centered energy is v itself (module docstring)
            v, u = shifted_sums(x, -1)
            inv = centered_inverse_norm(v, v + u * u / x.shape[-1], eps)
        else:
            inv = inverse_norm(sum_of_squares(x, -1), eps)
        inv = inv.unsqueeze(-1).to(_norm_dtype(input.dtype))
    out = (out * inv).to(_out_dtype(input, weight))
    unit_scale = None if unit_scale is None else unit_scale.to(out.dtype)
    return _scale_shift(out, unit_scale, None if bias is None else bias.to(out.dtype))


def cosine_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    gain: Tensor | None = None,
) -> Tensor:
    """Cosine-normalized ``F.linear``: ``input (..., in)``, ``weight (out, in)`` -> ``(..., out)``,
    each output ``gain * cos(w_j, x) + bias_j``."""
    if _observed():
        return _observer(LayerCall(input, weight, bias, gain, centered, eps))
    return _cosine_linear(input, weight, bias, centered, eps, gain)


def _cosine_linear(input, weight, bias, centered, eps, gain):
    w, unit_scale = _prepared_weight(weight, centered, eps, gain)
    return linear_normalized(input, w, bias, centered=centered, eps=eps, unit_scale=unit_scale)


def cosine_conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: str | _IntOrTuple = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    gain: Tensor | None = None,
) -> Tensor:
    """Cosine-normalized ``F.conv1d``; arguments as there."""
    return _cosine_conv(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain)


def cosine_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: str | _IntOrTuple = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    gain: Tensor | None = None,
) -> Tensor:
    """Cosine-normalized ``F.conv2d``; arguments as there."""
    return _cosine_conv(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain)


def cosine_conv3d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: _IntOrTuple = 1,
    padding: str | _IntOrTuple = 0,
    dilation: _IntOrTuple = 1,
    groups: int = 1,
    *,
    centered: bool = False,
    eps: float = 1e-6,
    gain: Tensor | None = None,
) -> Tensor:
    """Cosine-normalized ``F.conv3d``; arguments as there."""
    return _cosine_conv(input, weight, bias, stride, padding, dilation, groups, centered, eps, gain)


# -- products with a weight: matmul, einsum, grouped experts -----------------------------------
# A linear layer written as ``x @ W.T``, ``einsum("bld,hd->blh", x, W)`` or a grouped experts'
# ``_grouped_mm(x, W, offs)`` is still one dot product per output: of the weight's vector along the
# contracted dimensions with the input's. Normalizing both operands along those dimensions first
# turns each into a cosine, whatever the product's layout.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def matmul_equation(ndim_a: int, ndim_b: int) -> str:
    """``torch.matmul``'s contraction as an einsum equation, for operands of these ranks (1-D included)."""
    a = "...nk" if ndim_a > 1 else "k"
    b = "...km" if ndim_b > 1 else "k"
    out = ("...n" if ndim_a > 1 else "...") + ("m" if ndim_b > 1 else "")
    return f"{a},{b}->{out}"


def contracted_dims(equation: str, ndims: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The dimensions each of two operands (of ranks ``ndims``) is contracted over, counted from the end; None where the
    einsum is not a linear map of one by the other (a third operand, a diagonal, or a sum over a
    dimension of one operand alone)."""
    equation = equation.replace(" ", "")
    inputs, arrow, out = equation.partition("->")
    specs = inputs.split(",")
    if len(specs) != 2 or len(ndims) != 2:
        return None
    free = [c for c in _LETTERS if c not in equation]
    # an operand of unknown rank (-1) is taken to have one broadcast dimension (counts from the end hold)
    n_ell = [(n - (len(s) - 3) if n >= 0 else 1) if "..." in s else 0 for s, n in zip(specs, ndims)]
    ell = free[: max(n_ell)]
    specs = [s.replace("...", "".join(ell[len(ell) - k :])) for s, k in zip(specs, n_ell)]
    if arrow:
        out = out.replace("...", "".join(ell))
    else:  # implicit output: the broadcast dimensions, then the letters used once, in order
        counts = "".join(specs)
        out = "".join(ell) + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c not in ell))
    a, b = specs
    if len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    if any(c not in out and (c in a) != (c in b) for c in a + b):
        return None  # summed over in one operand alone: not a dot product of the two
    contracted = [c for c in a if c in b and c not in out]
    if not contracted:
        return None
    return tuple(a.index(c) - len(a) for c in contracted), tuple(b.index(c) - len(b) for c in contracted)


def _contraction_normalized(t: Tensor, dims: tuple[int, ...], centered: bool, eps: float) -> Tensor:
    """``t``'s vectors along ``dims`` over their norms (centered first if asked), in the norm type."""
    x = t.to(_norm_dtype(t.dtype))
    if centered:
        raw = x.square().sum(dims, keepdim=True)
        x = x - x.mean(dims, keepdim=True)
        return x * centered_inverse_norm(x.square().sum(dims, keepdim=True), raw, eps)
    return x * inverse_norm(x.square().sum(dims, keepdim=True), eps)


def _normalized_operands(
    a: Tensor, b: Tensor, dims: tuple[tuple[int, ...], tuple[int, ...]], weight: int, centered: bool, eps: float,
    gain: Tensor | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    a, b = (_contraction_normalized(t, d, centered, eps) for t, d in zip((a, b), dims))
    if gain is not None:  # broadcast over the weight operand, its contracted dimensions of size 1
        if weight == 0:
            a = a * gain.to(a.dtype)
        else:
            b = b * gain.to(b.dtype)
    return a, b


def cosine_einsum(
    equation: str, a: Tensor, b: Tensor, *, weight: int = 1, centered: bool = False, eps: float = 1e-6,
    gain: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``torch.einsum(equation, a, b)`` with each output the cosine of the two operands' vectors along the
    contracted dimensions; ``weight`` (0 or 1) names the weight operand, whose ``gain`` (shaped like it,
    its contracted dimensions of size 1) scales each output unit."""
    dims = contracted_dims(equation, (a.dim(), b.dim()))
    if dims is None:
        raise ValueError(f"einsum {equation!r} is not a linear map of one operand by the other")
    if _observed():
        return _observer(ProductCall((a, b)[weight], gain,
                                     lambda g: _cosine_einsum(equation, a, b, dims, weight, centered, eps, g),
                                     lambda: torch.einsum(equation, a, b)))  # fmt: skip
    return _cosine_einsum(equation, a, b, dims, weight, centered, eps, gain)


def _cosine_einsum(equation, a, b, dims, weight, centered, eps, gain) -> Tensor:
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    a_n, b_n = _normalized_operands(a, b, dims, weight, centered, eps, gain)
    with _CosineMath():
        return torch.einsum(equation, a_n, b_n).to(out_dtype)


def cosine_matmul(
    a: Tensor, b: Tensor, *, weight: int = 1, centered: bool = False, eps: float = 1e-6, gain: Tensor | None = None
) -> Tensor:
    """``a @ b`` (``torch.matmul``, ``mm``, ``bmm``) as cosines: see :func:`cosine_einsum`."""
    return cosine_einsum(matmul_equation(a.dim(), b.dim()), a, b, weight=weight, centered=centered, eps=eps, gain=gain)


def cosine_baddbmm(
    batch1: Tensor, batch2: Tensor, *, input: Tensor, beta: float = 1, alpha: float = 1, weight: int = 1,
    centered: bool = False, eps: float = 1e-6, gain: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``torch.baddbmm(input, batch1, batch2)``, ``beta * input + alpha * (batch1 @ batch2)``, with the
    product as cosines (RecurrentGemma's gates: a weight per head, ``batch2 (heads, in, out)``, and a bias)."""
    out = cosine_matmul(batch1, batch2, weight=weight, centered=centered, eps=eps, gain=gain)
    out = out if alpha == 1 else alpha * out
    return out if beta == 0 else out + (input if beta == 1 else beta * input)


def cosine_grouped_mm(
    a: Tensor, b: Tensor, offs: Tensor | None = None, bias: Tensor | None = None, out_dtype=None, *,
    weight: int = 1, centered: bool = False, eps: float = 1e-6, gain: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Grouped experts' ``torch._grouped_mm(a, b, offs)`` (``a (tokens, in)``, ``b (experts, in, out)``;
    ``F.grouped_mm`` is the same) as cosines: each token's input with each column of its expert's matrix."""
    extra = {} if bias is None and out_dtype is None else {"bias": bias, "out_dtype": out_dtype}
    if _observed():
        return _observer(ProductCall((a, b)[weight], gain,
                                     lambda g: _cosine_grouped_mm(a, b, offs, extra, weight, centered, eps, g),
                                     lambda: torch._grouped_mm(a, b, offs=offs, **extra)))  # fmt: skip
    return _cosine_grouped_mm(a, b, offs, extra, weight, centered, eps, gain)


def _cosine_grouped_mm(a, b, offs, extra, weight, centered, eps, gain) -> Tensor:
    a_n, b_n = _normalized_operands(a, b, ((-1,), (-2,)), weight, centered, eps, gain)
    dtype = torch.promote_types(a.dtype, b.dtype)
    with _CosineMath():
        return torch._grouped_mm(a_n.to(dtype), b_n.to(dtype), offs=offs, **extra)
