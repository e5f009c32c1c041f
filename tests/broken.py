"""A deliberately wrong ONNX file: one cosine function body changed, for the validation-failure tests."""

import onnx


def spoil_cosine_conv(src, dst) -> str:
    """Copy ``src`` to ``dst`` with CosineConv's norm made wrong (Sqrt -> Abs); returns the first CosineConv node's name."""
    proto = onnx.load(src)
    body = next(f for f in proto.functions if f.name == "CosineConv")
    next(n for n in body.node if n.op_type == "Sqrt").op_type = "Abs"
    onnx.save(proto, dst)
    return next(n.name for n in proto.graph.node if n.op_type == "CosineConv")
