"""A deliberately wrong ONNX file: one cosine function body changed, for the validation-failure tests."""

import onnx

from cosconvert.onnx.export import _all_nodes


def spoil_cosine_conv(src, dst) -> str:
    """Copy ``src`` to ``dst`` with CosineConv's norm made wrong (every Sqrt -> Abs); returns the first
    CosineConv node's name."""
    proto = onnx.load(src)
    body = next(f for f in proto.functions if f.name == "CosineConv")
    for node in _all_nodes(body):  # inside the body's If branches too
        if node.op_type == "Sqrt":
            node.op_type = "Abs"
    onnx.save(proto, dst)
    return next(n.name for n in proto.graph.node if n.op_type == "CosineConv")
