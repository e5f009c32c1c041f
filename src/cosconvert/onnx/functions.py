"""The cosine ops as ONNX functions: what each custom node computes, in standard ops.

Each exported cosine layer is one node of a custom op in the ``cosconvert`` domain whose
weight input ``W`` is already normalized (unit rows, centered for the Pearson form, gain
folded in), so a node computes

    Y = conv(X, W) * rsqrt(window_sum(|x|^2) - centered * window_sum(x)^2 / n) + B

The model carries these definitions as model-local functions, so any runtime without a
fused kernel runs the node as its body. Norms are taken in float32 whatever X's type.
"""

import onnx
import onnx.inliner
from onnxscript import FLOAT, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

DOMAIN = "cosconvert"
VERSION = 1
cosconvert_domain = Opset(DOMAIN, VERSION)
CONSTANT_TOL = 1e-5  # as cosconvert.functional.CONSTANT_TOL


@script(cosconvert_domain, default_opset=op)
def InverseNorm(sum_sq, total, n, centered: int, eps: float):
    """``1 / max(|x|, eps)`` of fields from their sums of squares, or (centered) ``1 / max(|x - mean|, eps)``
    from their sums too, 0 where a centered field is constant: :func:`cosconvert.functional.inverse_norm`.
    Written once here and inlined into both ops' bodies (:func:`function_protos`)."""
    c = op.CastLike(op.Constant(value_int=centered), sum_sq)
    energy = sum_sq - c * total * total / n
    floor = op.CastLike(op.Constant(value_float=eps), sum_sq)
    return op.Where(
        energy > op.CastLike(CONSTANT_TOL, sum_sq) * sum_sq,
        op.Reciprocal(op.Sqrt(op.Max(energy, floor * floor))),
        op.CastLike(0.0, sum_sq),
    )


@script(cosconvert_domain, default_opset=op)
def CosineConv(
    X, W, B, strides: list[int], pads: list[int], dilations: list[int], group: int, centered: int, eps: float
):
    """Cosine convolution of X (N, C, *spatial) with normalized W (O, C/group, *kernel), bias B (O,)."""
    x = op.Cast(X, to=FLOAT.dtype)
    groups = op.Reshape(op.Constant(value_int=group), op.Constant(value_ints=[1]))
    n_batch = op.Shape(x, start=0, end=1)
    spatial = op.Shape(x, start=2)
    xg = op.Reshape(x, op.Concat(n_batch, groups, op.Constant(value_ints=[-1]), spatial, axis=0))
    axis = op.Constant(value_ints=[2])
    sum_sq = op.ReduceSum(xg * xg, axis, keepdims=0)  # (N, group, *spatial)
    total = op.ReduceSum(xg, axis, keepdims=0)
    kernel_shape = op.Concat(groups, op.Constant(value_ints=[1]), op.Shape(W, start=2), axis=0)
    ones = op.Expand(op.CastLike(1.0, x), kernel_shape)  # (group, 1, *kernel): a window sum
    window_sq = op.Conv(sum_sq, ones, strides=strides, pads=pads, dilations=dilations, group=group)
    window = op.Conv(total, ones, strides=strides, pads=pads, dilations=dilations, group=group)
    n = op.CastLike(op.ReduceProd(op.Shape(W, start=1), keepdims=0), x)
    inv = InverseNorm(window_sq, window, n, centered=centered, eps=eps)
    y = op.Conv(X, W, strides=strides, pads=pads, dilations=dilations, group=group)
    out_spatial = op.Shape(y, start=2)
    yg = op.Reshape(y, op.Concat(n_batch, groups, op.Constant(value_ints=[-1]), out_spatial, axis=0))
    scaled = op.Reshape(op.CastLike(op.Cast(yg, to=FLOAT.dtype) * op.Unsqueeze(inv, axis), X), op.Shape(y))
    one = op.Constant(value_int=1)
    bias = op.Unsqueeze(B, op.Range(one, op.Size(out_spatial) + one, one))  # (O, 1, ..., 1)
    return scaled + bias


@script(cosconvert_domain, default_opset=op)
def CosineLinear(X, W, B, centered: int, eps: float):
    """Cosine linear layer: X (..., in), normalized W (out, in), bias B (out,)."""
    x = op.Cast(X, to=FLOAT.dtype)
    last = op.Constant(value_ints=[-1])
    sum_sq = op.ReduceSum(x * x, last, keepdims=1)
    total = op.ReduceSum(x, last, keepdims=1)
    n = op.CastLike(op.Shape(x, start=-1), x)
    inv = InverseNorm(sum_sq, total, n, centered=centered, eps=eps)
    y = op.MatMul(X, op.Transpose(W, perm=[1, 0]))
    return op.CastLike(op.Cast(y, to=FLOAT.dtype) * inv, X) + B


def function_protos(opset_version: int) -> dict[str, onnx.FunctionProto]:
    """The ops' FunctionProtos for a model of the given standard opset, with :func:`InverseNorm`
    inlined into each body, so the file needs no nested function calls (onnx's reference
    evaluator cannot run those)."""
    functions = [fn.to_function_proto() for fn in (CosineConv, CosineLinear, InverseNorm)]
    for fp in functions:
        del fp.opset_import[:]
        fp.opset_import.extend([onnx.helper.make_opsetid("", opset_version), onnx.helper.make_opsetid(DOMAIN, VERSION)])
    holder = onnx.helper.make_model(
        onnx.helper.make_graph([], "functions", [], []),
        opset_imports=[onnx.helper.make_opsetid("", opset_version), onnx.helper.make_opsetid(DOMAIN, VERSION)],
        functions=functions,
    )
    inlined = onnx.inliner.inline_selected_functions(holder, [(DOMAIN, InverseNorm.name)])
    out = {}
    for fp in inlined.functions:
        kept = [o for o in fp.opset_import if o.domain != DOMAIN]
        del fp.opset_import[:]
        fp.opset_import.extend(kept)
        out[fp.name] = fp
    return out
