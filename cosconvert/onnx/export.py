"""Export a converted network to ONNX, each cosine layer one custom-domain node.

``torch.export`` sees each cosine layer as one ``cosconvert::*_normalized`` op (see
:mod:`cosconvert.functional`); the translation table below turns it into one
``cosconvert.CosineConv`` / ``cosconvert.CosineLinear`` node, and the file carries the
ops' definitions (:mod:`cosconvert.onnx.functions`) as model-local functions.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx.inliner
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnx.defs import OpSchema
from onnxscript.values import Op
from torch import nn

from cosconvert.freeze import freeze
from cosconvert.onnx.functions import DOMAIN, VERSION, cosconvert_domain, function_protos

__all__ = ["export_onnx"]

EXTERNAL_DATA_ABOVE = 2**31 - 2**26  # protobuf cannot serialize 2 GB; leave room for the graph
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


def _schema(name: str, attributes: list[tuple[str, OpSchema.AttrType]]) -> OpSchema:
    schema = OpSchema(
        name, DOMAIN, VERSION,
        inputs=[OpSchema.FormalParameter(n, "T") for n in ("X", "W", "B")],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", _FLOATS, "float tensors")],
        attributes=[OpSchema.Attribute(a, t, "") for a, t in attributes],
    )  # fmt: skip
    if not onnx.defs.has(name, DOMAIN):
        onnx.defs.register_schema(schema)
    return schema


_A = OpSchema.AttrType
_CONV_OP = Op(cosconvert_domain, "CosineConv", _schema("CosineConv", [
    ("strides", _A.INTS), ("pads", _A.INTS), ("dilations", _A.INTS), ("group", _A.INT), ("centered", _A.INT),
    ("eps", _A.FLOAT),
]))  # fmt: skip
_LINEAR_OP = Op(cosconvert_domain, "CosineLinear", _schema("CosineLinear", [("centered", _A.INT), ("eps", _A.FLOAT)]))


def _conv(x, w, b, stride, padding, dilation, groups, centered, eps):
    pads = list(padding) * 2
    return _CONV_OP(
        x, w, b, strides=stride, pads=pads, dilations=dilation, group=groups, centered=int(centered), eps=eps
    )


def _linear(x, w, b, centered, eps):
    return _LINEAR_OP(x, w, b, centered=int(centered), eps=eps)


TRANSLATIONS = {
    torch.ops.cosconvert.conv_normalized.default: _conv,
    torch.ops.cosconvert.linear_normalized.default: _linear,
}


def _add_functions(proto: onnx.ModelProto) -> None:
    """Attach the cosine ops' definitions, with the model's own standard-opset version."""
    version = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    used = {n.op_type for n in _all_nodes(proto.graph) if n.domain == DOMAIN}
    proto.functions.extend(fp for name, fp in function_protos(version).items() if name in used)
    if used and not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))


def _inline(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same network in standard ops: each cosine node replaced by its body, whose branches test
    only constants (attributes, weight shapes), so they are then folded away, as onnxruntime would."""
    proto = onnx.inliner.inline_local_functions(proto)
    del proto.functions[:]
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return onnxscript.rewriter.rewrite(onnxscript.optimizer.optimize(proto))


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _all_nodes(attr.g)


def _write(proto: onnx.ModelProto, path: Path, external_above: int = EXTERNAL_DATA_ABOVE) -> None:
    """Write atomically: into a temporary folder beside ``path``, then rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        large = _weight_bytes(proto) > external_above
        data = f"{path.name}.data"
        onnx.save_model(
            proto,
            tmp / path.name,
            save_as_external_data=large,
            location=data,
            all_tensors_to_one_file=True,
        )  # tensors under 1 KB (shapes, axes) stay inline, where shape inference can read them
        onnx.checker.check_model(str(tmp / path.name), full_check=True)
        if (tmp / data).exists():
            os.replace(tmp / data, path.parent / data)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weight_bytes(proto: onnx.ModelProto) -> int:
    """Size of the initializers, from their shapes (serializing a >2 GB proto to measure it would fail)."""
    total = 0
    for t in proto.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += itemsize * math.prod(t.dims)
    return total


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    fp16: bool = False,
    inline: bool = False,
) -> Path:
    """Export a converted ``model`` to ``path`` and return the path.

    Each cosine layer becomes one ``cosconvert.CosineConv`` or ``cosconvert.CosineLinear``
    node with its weight normalized at export; the file defines both ops as model-local
    functions, so onnxruntime and ``onnx.reference`` run it without a plugin. ``inline=True``
    writes the same network in standard ops only, each layer's path through the op's body
    folded to plain nodes (slower to export: about 7 s more for vit_b_16). ``fp16`` exports
    in float16 (norms are still taken in float32 inside the ops). The batch dimension (dim 0
    of every input) is dynamic unless ``dynamic_batch=False``. The file passes ``onnx.checker`` (full check) and
    is written atomically; past 2 GB the weights go to ``<name>.data`` beside it.
    """
    path = Path(path)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    frozen = freeze(model)
    if fp16:
        frozen = frozen.half()
        inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(
        frozen, inputs, dynamo=True, custom_translation_table=TRANSLATIONS, dynamic_shapes=dynamic_shapes,
        opset_version=opset, optimize=True, verbose=False, report=False,
    )  # fmt: skip
    proto = program.model_proto
    _add_functions(proto)
    if inline:
        proto = _inline(proto)
    _write(proto, path)
    return path
