"""The cosine ops as ONNX functions: what each custom node computes, in standard ops.

Each exported cosine layer is one node of a custom op in the ``cosconvert`` domain whose
weight input ``W`` is already normalized (unit rows, centered for the Pearson form, gain
folded in), so a node computes

    Y = conv(X, W) / sqrt(window_sum(|x|^2) - [centered] window_sum(x)^2 / n) + B

The model carries these definitions as model-local functions, so any runtime without a
fused kernel runs the node as its body. Norms are taken in float32 whatever X's type. The
PyTorch layers finish the centered energy in float64; onnxruntime has no float64 convolution
for the window sums, so the centered body forms it in float32 twice, from X and from X shifted
by a constant per sample and group, and keeps for each field the form that cancels less
(:func:`CenteredEnergy`).

The bodies branch (``If``) on attributes and on W's shape alone. onnxruntime inlines a
function no provider claims and then folds such branches, so each layer runs only its own
path: 4 to 8 nodes for a plain cosine conv (it does not drop unused nodes, which is why
nothing is computed outside the branch that needs it). Where a field is one position (a 1x1
kernel, no stride or padding) X is divided by its norm (``ReduceL2`` over the channels) before
the Conv, which then adds the bias and takes onnxruntime's fusions with the activation after it.
The helper functions are inlined into the two ops' bodies when the file is written
(:func:`function_protos`).
"""

import onnx
import onnx.inliner
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "cosconvert"
VERSION = 1
cosconvert_domain = Opset(DOMAIN, VERSION)
CONSTANT_TOL = 1e-5  # as cosconvert.functional.CONSTANT_TOL
INF = float("inf")


@script(cosconvert_domain, default_opset=op)
def Norm(sum_sq, eps: float):
    """``max(|x|, eps)`` of vectors from their sums of squares."""
    floor = op.CastLike(op.Constant(value_float=eps), sum_sq)
    return op.Sqrt(op.Max(sum_sq, floor * floor))


@script(cosconvert_domain, default_opset=op)
def Floored(norm, eps: float):
    """``max(norm, eps)``: a zero vector's norm, so that dividing by it gives 0."""
    return op.Max(norm, op.CastLike(op.Constant(value_float=eps), norm))


@script(cosconvert_domain, default_opset=op)
def CenteredNorm(energy, sum_sq, eps: float):
    """``max(|x - mean x|, eps)`` of vectors from their centered energy ``|x - mean x|^2`` and raw
    ``|x|^2``; infinite where a vector is constant (energy under ``CONSTANT_TOL`` of the raw), so
    that dividing by it gives 0."""
    constant = energy <= op.CastLike(CONSTANT_TOL, sum_sq) * sum_sq
    return op.Where(constant, op.CastLike(INF, sum_sq), Norm(energy, eps=eps))


@script(cosconvert_domain, default_opset=op)
def GroupSum(v, W, group: int):
    """Sum of ``v`` (N, C, *spatial) over each group's channels at every position: (N, group, *spatial).
    With one channel per group (depthwise) that is ``v``, with one group a sum over axis 1: neither
    needs shape arithmetic at run time."""
    one = op.Constant(value_ints=[1])
    groups = op.Reshape(op.Constant(value_int=group), one)
    per_group = op.Shape(W, start=1, end=2)  # C / group
    if op.Equal(per_group, one):
        total = op.Identity(v)
    elif op.Equal(groups, one):
        total = op.ReduceSum(v, one, keepdims=1)
    else:
        grouped = op.Reshape(v, op.Concat(op.Constant(value_ints=[0]), groups, per_group, op.Shape(v, start=2), axis=0))
        total = op.ReduceSum(grouped, op.Constant(value_ints=[2]), keepdims=0)
    return total


@script(cosconvert_domain, default_opset=op)
def Ones(v, W, group: int):
    """The kernel of ones (group, 1, *W's kernel) in ``v``'s type that sums each window of a grouped Conv."""
    one = op.Constant(value_ints=[1])
    return op.Expand(
        op.CastLike(1.0, v), op.Concat(op.Reshape(op.Constant(value_int=group), one), one, op.Shape(W, start=2), axis=0)
    )


@script(cosconvert_domain, default_opset=op)
def WindowSum(v, W, strides: list[int], pads: list[int], dilations: list[int], group: int):
    """Sum of ``v`` (N, group, *spatial) over every window of a convolution with ``W``'s kernel:
    (N, group, *out). A 1x1 kernel with stride 1 and no padding sums nothing: that is ``v``."""
    one = op.Constant(value_ints=[1])
    single = op.Equal(op.ReduceProd(op.Shape(W, start=2), keepdims=1), one)
    unpadded = op.Equal(op.ReduceMax(op.Constant(value_ints=pads), keepdims=1), op.Constant(value_ints=[0]))
    unstrided = op.Equal(op.ReduceMax(op.Constant(value_ints=strides), keepdims=1), one)
    if op.And(single, op.And(unpadded, unstrided)):
        window = op.Identity(v)
    else:
        window = op.Conv(v, Ones(v, W, group=group), strides=strides, pads=pads, dilations=dilations, group=group)
    return window


@script(cosconvert_domain, default_opset=op)
def PaddedWindowSum(v, W, strides: list[int], dilations: list[int], group: int):
    """:func:`WindowSum` of a ``v`` already padded: every window lies inside it, so no pads."""
    return op.Conv(v, Ones(v, W, group=group), strides=strides, dilations=dilations, group=group)


@script(cosconvert_domain, default_opset=op)
def GroupMean(x, W, group: int):
    """Mean of ``x`` (N, C, *spatial) over each group's channels and all positions, for every sample,
    as (N, C, 1, ..., 1): the same value for all channels of a group."""
    one = op.Constant(value_ints=[1])
    groups = op.Reshape(op.Constant(value_int=group), one)
    per_group = op.Shape(W, start=1, end=2)  # C / group
    rank = op.Size(op.Shape(W))  # X's rank, known when the graph is loaded (W is a constant)
    if op.Equal(per_group, one):
        mean = op.ReduceMean(x, op.Range(op.Constant(value_int=2), rank, op.Constant(value_int=1)))
    elif op.Equal(groups, one):
        mean = op.ReduceMean(x, op.Range(op.Constant(value_int=1), rank, op.Constant(value_int=1)))
    else:
        spatial = op.Range(op.Constant(value_int=2), rank, op.Constant(value_int=1))
        grouped = op.Reshape(
            op.ReduceMean(x, spatial), op.Concat(op.Constant(value_ints=[0]), groups, per_group, axis=0)
        )
        group_means = op.Expand(op.ReduceMean(grouped, op.Constant(value_ints=[2])), op.Shape(grouped))
        mean = op.Reshape(
            group_means, op.Concat(op.Shape(x, start=0, end=2), op.Expand(one, op.Shape(spatial)), axis=0)
        )
    return mean


@script(cosconvert_domain, default_opset=op)
def CenteredEnergy(x, W, sum_sq, strides: list[int], pads: list[int], dilations: list[int], group: int):
    """``|x - mean x|^2`` of every field (N, group, *out), given its ``|x|^2`` (``sum_sq``).

    As ``S2 - S1^2 / n``, float32 keeps about ``1e-7 * S2``, which is nothing left of a field whose
    mean dwarfs its spread. So it is also formed from the sums of ``x - c``, with ``c`` each
    sample's mean over a group's channels: constant over every field (its zero padding included, so
    ``x`` is padded first and these window sums take no pads), it leaves the energy unchanged in
    exact arithmetic. Each field keeps the form whose ``S2`` is smaller: the shifted one on an
    offset input, the plain one where a field lies far from ``c`` (a patch of ReLU zeros in a
    channel whose mean is large), where shifting would cancel instead."""
    n = op.CastLike(op.ReduceProd(op.Shape(W, start=1), keepdims=0), x)
    total = WindowSum(GroupSum(x, W, group=group), W, strides=strides, pads=pads, dilations=dilations, group=group)
    if op.Equal(op.ReduceMax(op.Constant(value_ints=pads), keepdims=1), op.Constant(value_ints=[0])):
        padded = op.Identity(x)
    else:
        begins_ends = op.Reshape(op.Constant(value_ints=pads), op.Constant(value_ints=[2, -1]))
        unpadded_axes = op.Constant(
            value=onnx.helper.make_tensor("zeros", onnx.TensorProto.INT64, [2, 2], [0, 0, 0, 0])
        )
        padded = op.Pad(x, op.Reshape(op.Concat(unpadded_axes, begins_ends, axis=1), op.Constant(value_ints=[-1])))
    shifted = padded - GroupMean(x, W, group=group)
    shifted_sq = PaddedWindowSum(  # no pads
        GroupSum(shifted * shifted, W, group=group), W, strides=strides, dilations=dilations, group=group
    )
    shifted_total = PaddedWindowSum(
        GroupSum(shifted, W, group=group), W, strides=strides, dilations=dilations, group=group
    )
    energy = sum_sq - total * total / n
    shifted_energy = shifted_sq - shifted_total * shifted_total / n
    return op.Where(shifted_sq < sum_sq, shifted_energy, energy)


@script(cosconvert_domain, default_opset=op)
def CosineConv(
    X, W, B, strides: list[int], pads: list[int], dilations: list[int], group: int, centered: int, eps: float
):
    """Cosine convolution of X (N, C, *spatial) with normalized W (O, C/group, *kernel), bias B (O,).

    Every branch tests only attributes and W's shape, so a runtime that inlines the function folds
    them to constants: what runs is this layer's own path (on onnxruntime, 4 to 8 nodes)."""
    x = op.Cast(X, to=FLOAT.dtype)
    one = op.Constant(value_ints=[1])
    groups = op.Reshape(op.Constant(value_int=group), one)
    per_group = op.Shape(W, start=1, end=2)  # C / group
    single = op.Equal(op.ReduceProd(op.Shape(W, start=2), keepdims=1), one)
    unpadded = op.Equal(op.ReduceMax(op.Constant(value_ints=pads), keepdims=1), op.Constant(value_ints=[0]))
    unstrided = op.Equal(op.ReduceMax(op.Constant(value_ints=strides), keepdims=1), one)
    broadcasts = op.Or(op.Equal(groups, one), op.Equal(per_group, one))  # norm: (N, 1 or C, *spatial)
    plain = op.Not(op.Cast(op.Constant(value_int=centered), to=BOOL.dtype))  # a centered X is off by its mean
    if op.And(op.And(op.And(single, broadcasts), op.And(unpadded, unstrided)), plain):
        # A field is one position: scale the input first, and the Conv adds the bias (and takes
        # onnxruntime's fusions with the activation after it). Its norm: one ReduceL2, then the floor.
        if op.Equal(per_group, one):
            norm = Floored(op.Abs(x), eps=eps)  # depthwise: a field is one value
        else:
            norm = Floored(op.ReduceL2(x, one, keepdims=1), eps=eps)
        out = op.Conv(op.CastLike(x / norm, X), W, B, strides=strides, pads=pads, dilations=dilations, group=group)
    else:
        window_sq = WindowSum(  # |x|^2 of every field: (N, group, *out)
            GroupSum(x * x, W, group=group), W, strides=strides, pads=pads, dilations=dilations, group=group
        )
        if op.Cast(op.Constant(value_int=centered), to=BOOL.dtype):
            energy = CenteredEnergy(x, W, window_sq, strides=strides, pads=pads, dilations=dilations, group=group)
            norm = CenteredNorm(energy, window_sq, eps=eps)
        else:
            norm = Norm(window_sq, eps=eps)
        y = op.Cast(op.Conv(X, W, strides=strides, pads=pads, dilations=dilations, group=group), to=FLOAT.dtype)
        if op.Or(op.Equal(groups, one), op.Equal(op.Shape(W, start=0, end=1), groups)):
            scaled = y / norm  # one norm for all output channels, or one for each
        else:
            y_groups = op.Concat(
                op.Constant(value_ints=[0]), groups, op.Constant(value_ints=[-1]), op.Shape(y, start=2), axis=0
            )
            scaled = op.Reshape(op.Reshape(y, y_groups) / op.Unsqueeze(norm, op.Constant(value_ints=[2])), op.Shape(y))
        spatial_axes = op.Range(
            op.Constant(value_int=1), op.Size(op.Shape(W)) - op.Constant(value_int=1), op.Constant(value_int=1)
        )
        out = op.CastLike(scaled, X) + op.Unsqueeze(B, spatial_axes)  # B as (O, 1, ..., 1)
    return out


@script(cosconvert_domain, default_opset=op)
def CosineLinear(X, W, B, centered: int, eps: float):
    """Cosine linear layer: X (..., in), normalized W (out, in), bias B (out,)."""
    x = op.Cast(X, to=FLOAT.dtype)
    last = op.Constant(value_ints=[-1])
    if op.Cast(op.Constant(value_int=centered), to=BOOL.dtype):
        sum_sq = op.ReduceSumSquare(x, last, keepdims=1)
        norm = CenteredNorm(op.ReduceSumSquare(x - op.ReduceMean(x, last), last, keepdims=1), sum_sq, eps=eps)
    else:
        norm = Floored(op.ReduceL2(x, last, keepdims=1), eps=eps)
    y = op.MatMul(X, op.Transpose(W, perm=[1, 0]))
    return op.CastLike(op.Cast(y, to=FLOAT.dtype) / norm, X) + B


HELPERS = (
    Norm,
    Floored,
    CenteredNorm,
    GroupSum,
    Ones,
    WindowSum,
    PaddedWindowSum,
    GroupMean,
    CenteredEnergy,
)  # inlined into the ops' bodies


def function_protos(opset_version: int) -> dict[str, onnx.FunctionProto]:
    """The ops' FunctionProtos for a model of the given standard opset, with the ``HELPERS``
    inlined into each body, so the file needs no nested function calls (onnx's reference
    evaluator cannot run those)."""
    functions = [fn.to_function_proto() for fn in (CosineConv, CosineLinear, *HELPERS)]
    for fp in functions:
        del fp.opset_import[:]
        fp.opset_import.extend([onnx.helper.make_opsetid("", opset_version), onnx.helper.make_opsetid(DOMAIN, VERSION)])
    holder = onnx.helper.make_model(
        onnx.helper.make_graph([], "functions", [], []),
        opset_imports=[onnx.helper.make_opsetid("", opset_version), onnx.helper.make_opsetid(DOMAIN, VERSION)],
        functions=functions,
    )
    helpers = [(DOMAIN, fn.name) for fn in HELPERS]
    inlined = onnx.inliner.inline_selected_functions(holder, helpers)
    out = {}
    for fp in inlined.functions:
        kept = [o for o in fp.opset_import if o.domain != DOMAIN]
        del fp.opset_import[:]
        fp.opset_import.extend(kept)
        out[fp.name] = fp
    return out
