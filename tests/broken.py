"""A deliberately wrong ONNX file: one cosine function body changed, for the validation-failure tests."""

import onnx


def _nodes(nodes):
    """Every node, inside If branches too."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            yield from _nodes(attr.g.node)


def spoil_cosine_conv(src, dst) -> str:
    """Copy ``src`` to ``dst`` with CosineConv's norm made wrong (every Sqrt -> Abs); returns the first
    CosineConv node's name."""
    proto = onnx.load(src)
    body = next(f for f in proto.functions if f.name == "CosineConv")
    for node in _nodes(body.node):
        if node.op_type == "Sqrt":
            node.op_type = "Abs"
    onnx.save(proto, dst)
    return next(n.name for n in proto.graph.node if n.op_type == "CosineConv")
