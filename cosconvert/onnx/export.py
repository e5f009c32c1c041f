"""Export a converted network to ONNX, each cosine layer one custom-domain node.

``torch.export`` sees each cosine layer as one ``cosconvert::*_normalized`` op (see
:mod:`cosconvert.functional`); the translation table below turns it into one
``cosconvert.CosineConv`` / ``cosconvert.CosineLinear`` node, and the file carries the
ops' definitions (:mod:`cosconvert.onnx.functions`) as model-local functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnx.defs import OpSchema
from onnxscript.values import Op
from torch import nn

from cosconvert.atomic import atomic_folder
from cosconvert.freezing import freeze
from cosconvert.onnx.functions import DOMAIN, VERSION, cosconvert_domain, function_protos

__all__ = ["export_onnx", "ExportError", "file_sha256"]

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


def _keep_zero_pads(proto: onnx.ModelProto) -> None:
    """Make each zero ``Pad`` feeding a ``MaxPool`` (directly or through a ``Cast``) pad with -0.0.

    onnxruntime's PadFusion (1.31.1) folds a ``Pad`` whose constant is all zero bytes into a
    following MaxPool's ``pads``, though a MaxPool pads with -inf: windows at the border of a map with
    negative values change (rel 5e-2 on resnetv2's stem, converted or not). -0.0 equals 0, so every
    output is the same, but its bytes are not zero, so PadFusion leaves the Pad alone. (It fuses a zero
    Pad into an AveragePool exactly.)"""
    graph = proto.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {i.name: i for i in graph.initializer}
    for k, pad in enumerate(n for n in graph.node if n.op_type == "Pad" and n.domain in ("", "ai.onnx")):
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = initializers.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        child = consumers.get(pad.output[0], [])
        if len(child) == 1 and child[0].op_type == "Cast":
            child = consumers.get(child[0].output[0], [])
        if mode != b"constant" or value is None or len(child) != 1 or child[0].op_type != "MaxPool":
            continue
        zero = onnx.numpy_helper.to_array(value)
        if zero.dtype.kind != "f" or zero.any():
            continue
        negative = onnx.numpy_helper.from_array(np.full_like(zero, -0.0), f"{pad.name or 'pad'}_{k}_negative_zero")
        graph.initializer.append(negative)
        pad.input[2] = negative.name


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _all_nodes(attr.g)


def _write(proto: onnx.ModelProto, path: Path, external_above: int = EXTERNAL_DATA_ABOVE) -> None:
    """Write atomically: into a temporary folder beside ``path``, then rename into place."""
    with atomic_folder(path) as tmp:
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


def _weight_bytes(proto: onnx.ModelProto) -> int:
    """Size of the initializers, from their shapes (serializing a >2 GB proto to measure it would fail)."""
    total = 0
    for t in proto.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += itemsize * math.prod(t.dims)
    return total


class ExportError(RuntimeError):
    """An export that cannot be done as asked, in one line: why, and what to do."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Nothing from the exporter reaches the terminal: no warnings, no log records, no prints,
    nothing C++ writes to file descriptors 1 and 2."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                yield
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                for lg, level in zip(loggers, levels):
                    lg.setLevel(level)


def _cause(err: BaseException) -> str:
    """The innermost error's own first line, without the exporter's banner or colour codes."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("For more information", "Traceback", "File "))]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _fixed_axes(
    proto: onnx.ModelProto, dynamic_shapes: Sequence[Mapping[int, object]], names: list[str] | None
) -> list[str]:
    """Graph inputs whose axes asked to be dynamic came out as fixed numbers, not symbols
    (inputs given by name are matched by name, positional ones by position)."""
    initializers = {i.name for i in proto.graph.initializer}
    values = [v for v in proto.graph.input if v.name not in initializers]
    if names:
        by_name = {v.name: v for v in values}
        values = [by_name.get(n, onnx.ValueInfoProto()) for n in names]
    fixed = []
    for value, axes in zip(values, dynamic_shapes):
        dims = value.type.tensor_type.shape.dim
        for axis in sorted(axes):
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{value.name} ({_AXIS_NAMES.get(axis, f'axis {axis}')} {dims[axis].dim_value})")
    return fixed


_AXIS_NAMES = {0: "batch", 1: "sequence"}


def _default_dynamic_shapes(inputs: tuple, dynamic_batch: bool) -> tuple[dict[int, object], ...]:
    """Dim 0 of every input is the batch (unless ``dynamic_batch=False``); dim 1 of every integer input
    or bool input of 2 dims (token ids, their masks) is the sequence, one length shared by all."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    sequence = torch.export.Dim("sequence", min=2, max=65536)
    shapes = []
    for x in inputs:
        axes: dict[int, object] = {}
        if isinstance(x, torch.Tensor) and x.dim():
            if dynamic_batch:
                axes[0] = batch
            if x.dim() == 2 and not x.is_floating_point() and not x.is_complex():
                axes[1] = sequence
        shapes.append(axes)
    return tuple(shapes)


def _batch_of_two(inputs: tuple) -> tuple:
    """Inputs with a batch of at least 2: exporting from a batch of 1 lets the tracer fix the batch to 1."""
    return tuple(
        torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x for x in inputs
    )


@torch.no_grad()
def _check_runs(model: nn.Module, inputs: tuple, names: list[str] | None) -> None:
    try:
        model(**dict(zip(names, inputs))) if names else model(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure here means the batch is fixed
        batch = inputs[0].shape[0]
        raise ExportError(
            f"the model does not run at batch {batch} ({_cause(err)}), so its batch cannot be dynamic; export with "
            "a fixed batch (--static-batch, or dynamic_batch=False) at the batch size you will run"
        ) from err


def _settings(model: nn.Module) -> dict:
    report = getattr(model, "cosine_report", None)
    return dict(report.settings) if report is not None else {}


def _version() -> str:
    """The installed cosconvert's version; a source checkout on ``PYTHONPATH`` has no metadata."""
    try:
        return importlib.metadata.version("cosconvert")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _set_metadata(proto: onnx.ModelProto, model: nn.Module, fp16: bool, inline: bool, extra: Mapping) -> None:
    props = {
        "cosconvert_version": _version(),
        "conversion_settings": json.dumps(_settings(model), default=str, sort_keys=True),
        "export_settings": json.dumps({"fp16": fp16, "inline": inline}),
        **{k: str(v) for k, v in extra.items()},
    }
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: Sequence[Mapping[int, object]] | Mapping[str, Mapping[int, object]] | None = None,
    opset: int | None = None,
    fp16: bool = False,
    inline: bool = False,
    metadata: Mapping[str, str] | None = None,
    verbose: bool = False,
) -> Path:
    """Export a converted ``model`` to ``path`` and return the path.

    Each cosine layer becomes one ``cosconvert.CosineConv`` or ``cosconvert.CosineLinear``
    node with its weight normalized at export; the file defines both ops as model-local
    functions, so onnxruntime and ``onnx.reference`` run it without a plugin. ``inline=True``
    writes the same network in standard ops only, each layer's path through the op's body
    folded to plain nodes (slower to export: about 7 s more for vit_b_16). ``fp16`` exports
    in float16 (norms are still taken in float32 inside the ops).

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors (the
    file's inputs then take those names: ``{"input_ids": ..., "attention_mask": ...}`` for a text
    model whose mask is not its second positional parameter, as in GPT-2).

    The batch axis (dim 0 of every input) is dynamic unless ``dynamic_batch=False``:
    an example batch of 1 is traced as 2. So is the sequence axis (dim 1) of every 2-dim integer
    or bool input (token ids, attention masks; trace with 2+ tokens). ``dynamic_shapes`` (one
    ``{axis: torch.export.Dim}`` per input, or per name for a dict) replaces both defaults. Where the model fixes an axis
    asked to be dynamic, an :class:`ExportError` says so and nothing is written. ``metadata_props`` carry the cosconvert
    version, the conversion and export settings, and ``metadata``'s entries. The exporter's
    logs, warnings and progress lines are shown only with ``verbose=True``; its failures become
    one-line :class:`ExportError` messages. The file passes ``onnx.checker`` (full check) and is
    written atomically; past 2 GB the weights go to ``<name>.data`` beside it.
    """
    path = Path(path)
    names = list(example_inputs) if isinstance(example_inputs, Mapping) else None
    if names:
        inputs = tuple(example_inputs.values())
    else:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    frozen = freeze(model)
    if fp16:
        frozen = frozen.half()
        inputs = tuple(x.half() if x.is_floating_point() else x for x in inputs)
    if dynamic_batch:
        inputs = _batch_of_two(inputs)
    if dynamic_shapes is None:
        dynamic_shapes = _default_dynamic_shapes(inputs, dynamic_batch)
    if isinstance(dynamic_shapes, Mapping):
        dynamic_shapes = [dynamic_shapes.get(n) for n in names or ()]
    dynamic_shapes = tuple(dict(axes or {}) for axes in dynamic_shapes)
    quiet = contextlib.nullcontext if verbose else _silenced
    with quiet():  # fx prints a failing GraphModule's code to stderr
        if dynamic_batch:
            _check_runs(frozen, inputs, names)
    try:
        with quiet():
            program = torch.onnx.export(
                frozen, () if names else inputs, kwargs=dict(zip(names, inputs)) if names else None, dynamo=True,
                custom_translation_table=TRANSLATIONS, opset_version=opset, optimize=True, verbose=verbose,
                dynamic_shapes=dict(zip(names, dynamic_shapes)) if names else dynamic_shapes, report=False,
            )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - the exporter raises many types, each with pages of context
        cause = _cause(err)
        if cache := re.search(r"\b(\w*Cache)\b", cause):
            raise ExportError(
                f"the model returns a {cache.group(1)} (a key/value cache object), which ONNX cannot output ({cause}); "
                "export without the cache (e.g. model.config.use_cache = False)"
            ) from err
        axes = sorted({_AXIS_NAMES.get(a, f"axis {a}") for shape in dynamic_shapes for a in shape})
        if axes and re.search(r"constraint|guard|specializ|inconsistent|dynamic|batch|\bs\d+\b", cause, re.I):
            raise ExportError(
                f"the {' and '.join(axes)} {'axis' if len(axes) == 1 else 'axes'} cannot be exported as dynamic "
                f"({cause}); export with them fixed "
                "(--static-batch, or dynamic_batch=False, or dynamic_shapes without them) at the sizes you will run"
            ) from err
        raise ExportError(f"torch.onnx.export failed: {cause}") from err
    proto = program.model_proto
    _add_functions(proto)
    if inline:
        proto = _inline(proto)
    _keep_zero_pads(proto)
    if fixed := _fixed_axes(proto, dynamic_shapes, names):
        raise ExportError(
            f"the model fixes axes asked to be dynamic ({', '.join(fixed)}); export with those axes fixed "
            "(--static-batch, or dynamic_batch=False, or dynamic_shapes without them) at the sizes you will run"
        )
    _set_metadata(proto, model, fp16, inline, metadata or {})
    _write(proto, path)
    return path
