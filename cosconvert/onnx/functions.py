"""The cosine ops as ONNX functions: what each custom node computes, in standard ops.

Each exported cosine layer is one node of a custom op in the ``cosconvert`` domain whose
weight input ``W`` is already normalized (unit rows, centered for the Pearson form, gain
folded in), so a node computes

    Y = conv(X, W) / sqrt(window_sum(|x|^2) - [centered] window_sum(x)^2 / n) + B

The model carries these definitions as model-local functions, so any runtime without a
fused kernel runs the node as its body. Norms are taken in float32 whatever X's type; unlike
the PyTorch layers, the centered energy is formed in float32 too (float64 is not worth its
cost in a deployed graph; the validation tolerances hold on every tested model).

The bodies branch (``If``) on attributes and on W's shape alone. onnxruntime inlines a
function no provider claims and then folds such branches, so each layer runs only its own
path: 8 or 9 nodes for a plain cosine conv (it does not drop unused nodes, which is why
nothing is computed outside the branch that needs it). The helper functions are inlined
into the two ops' bodies when the file is written (:func:`function_protos`).
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


@script(cosconvert_domain, default_opset=op)
def InverseNorm(sum_sq, eps: float):
    """``1 / max(|x|, eps)`` of vectors from their sums of squares."""
    floor = op.CastLike(op.Constant(value_float=eps), sum_sq)
    return op.Reciprocal(op.Sqrt(op.Max(sum_sq, floor * floor)))


@script(cosconvert_domain, default_opset=op)
def CenteredInverseNorm(sum_sq, total, n, eps: float):
    """``1 / max(|x - mean x|, eps)`` of vectors of ``n`` values from their sums of squares and sums,
    0 where a vector is constant (its centered energy under ``CONSTANT_TOL`` of its raw energy)."""
    energy = sum_sq - total * total / n
    constant = energy <= op.CastLike(CONSTANT_TOL, sum_sq) * sum_sq
    return op.Where(constant, op.CastLike(0.0, sum_sq), InverseNorm(energy, eps=eps))


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
def WindowSum(v, W, strides: list[int], pads: list[int], dilations: list[int], group: int):
    """Sum of ``v`` (N, group, *spatial) over every window of a convolution with ``W``'s kernel:
    (N, group, *out). A 1x1 kernel with stride 1 and no padding sums nothing: that is ``v``."""
    one = op.Constant(value_ints=[1])
    kernel = op.Shape(W, start=2)
    single = op.Equal(op.ReduceProd(kernel, keepdims=1), one)
    unpadded = op.Equal(op.ReduceMax(op.Constant(value_ints=pads), keepdims=1), op.Constant(value_ints=[0]))
    unstrided = op.Equal(op.ReduceMax(op.Constant(value_ints=strides), keepdims=1), one)
    if op.And(single, op.And(unpadded, unstrided)):
        window = op.Identity(v)
    else:
        ones = op.Expand(
            op.CastLike(1.0, v), op.Concat(op.Reshape(op.Constant(value_int=group), one), one, kernel, axis=0)
        )
        window = op.Conv(v, ones, strides=strides, pads=pads, dilations=dilations, group=group)
    return window


@script(cosconvert_domain, default_opset=op)
def CosineConv(
    X, W, B, strides: list[int], pads: list[int], dilations: list[int], group: int, centered: int, eps: float
):
    """Cosine convolution of X (N, C, *spatial) with normalized W (O, C/group, *kernel), bias B (O,).

    Every branch tests only attributes and W's shape, so a runtime that inlines the function folds
    them to constants: what runs is this layer's own path (on onnxruntime, 8 or 9 nodes)."""
    x = op.Cast(X, to=FLOAT.dtype)
    one = op.Constant(value_ints=[1])
    groups = op.Reshape(op.Constant(value_int=group), one)
    window_sq = WindowSum(  # |x|^2 of every field: (N, group, *out)
        GroupSum(x * x, W, group=group), W, strides=strides, pads=pads, dilations=dilations, group=group
    )
    if op.Cast(op.Constant(value_int=centered), to=BOOL.dtype):
        window = WindowSum(GroupSum(x, W, group=group), W, strides=strides, pads=pads, dilations=dilations, group=group)
        n = op.CastLike(op.ReduceProd(op.Shape(W, start=1), keepdims=0), x)
        inv = CenteredInverseNorm(window_sq, window, n, eps=eps)
    else:
        inv = InverseNorm(window_sq, eps=eps)
    y = op.Cast(op.Conv(X, W, strides=strides, pads=pads, dilations=dilations, group=group), to=FLOAT.dtype)
    if op.Or(op.Equal(groups, one), op.Equal(op.Shape(W, start=0, end=1), groups)):
        scaled = y * inv  # one norm for all output channels, or one for each
    else:
        y_groups = op.Concat(
            op.Constant(value_ints=[0]), groups, op.Constant(value_ints=[-1]), op.Shape(y, start=2), axis=0
        )
        scaled = op.Reshape(op.Reshape(y, y_groups) * op.Unsqueeze(inv, op.Constant(value_ints=[2])), op.Shape(y))
    spatial_axes = op.Range(
        op.Constant(value_int=1), op.Size(op.Shape(W)) - op.Constant(value_int=1), op.Constant(value_int=1)
    )
    return op.CastLike(scaled, X) + op.Unsqueeze(B, spatial_axes)  # B as (O, 1, ..., 1)


@script(cosconvert_domain, default_opset=op)
def CosineLinear(X, W, B, centered: int, eps: float):
    """Cosine linear layer: X (..., in), normalized W (out, in), bias B (out,)."""
    x = op.Cast(X, to=FLOAT.dtype)
    last = op.Constant(value_ints=[-1])
    sum_sq = op.ReduceSumSquare(x, last, keepdims=1)
    if op.Cast(op.Constant(value_int=centered), to=BOOL.dtype):
        inv = CenteredInverseNorm(
            sum_sq, op.ReduceSum(x, last, keepdims=1), op.CastLike(op.Shape(x, start=-1), x), eps=eps
        )
    else:
        inv = InverseNorm(sum_sq, eps=eps)
    y = op.MatMul(X, op.Transpose(W, perm=[1, 0]))
    return op.CastLike(op.Cast(y, to=FLOAT.dtype) * inv, X) + B


HELPERS = (InverseNorm, CenteredInverseNorm, GroupSum, WindowSum)  # inlined into the ops' bodies


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
