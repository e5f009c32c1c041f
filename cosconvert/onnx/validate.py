"""Check that an exported file computes what the PyTorch model computes, on every runtime at hand.

Tolerances depend on the file's float type: float32 passes when the largest absolute
error is at most ``atol + rtol * max|reference|`` with ``rtol=1e-4, atol=1e-5``; float16
with ``rtol=atol=1e-2``. "Relative error" is the largest absolute error over the largest
reference magnitude, which stays meaningful where single outputs are near zero.

On failure the report names the first node that diverges: every ``cosconvert`` node's
output in the runtime is compared with PyTorch's :func:`cosconvert.functional.conv_normalized`
/ ``linear_normalized`` on the same node inputs, in graph order.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cosconvert import functional as CF
from cosconvert.onnx.functions import DOMAIN

__all__ = ["validate", "ValidationReport", "available_providers", "TOLERANCES"]

TOLERANCES = {"float32": {"rtol": 1e-4, "atol": 1e-5}, "float16": {"rtol": 1e-2, "atol": 1e-2}}
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


@dataclass
class ProviderResult:
    provider: str
    max_abs_error: float
    max_rel_error: float
    cosine: float
    top1_agreement: float | None
    latency_ms: float
    passed: bool
    first_divergence: str | None = None


@dataclass
class ValidationReport:
    path: str
    dtype: str
    tolerance: dict
    batch_sizes: list[int]
    results: list[ProviderResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    def __str__(self) -> str:
        head = f"{'provider':28} {'max abs':>10} {'max rel':>10} {'cosine':>9} {'top-1 %':>8} {'ms':>8}  result"
        lines = [
            f"{self.path} ({self.dtype}, batches {self.batch_sizes}, tolerance {self.tolerance})",
            head,
            "-" * len(head),
        ]
        for r in self.results:
            top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.1f}"
            verdict = "pass" if r.passed else f"FAIL (first divergence: {r.first_divergence})"
            lines.append(
                f"{r.provider:28} {r.max_abs_error:10.2e} {r.max_rel_error:10.2e} {r.cosine:9.6f} {top1:>8} "
                f"{r.latency_ms:8.2f}  {verdict}"
            )
        return "\n".join(lines)


def _provider_loads(provider: str) -> bool:
    """Whether ``provider`` really runs here (onnxruntime-gpu lists CUDA even without a GPU)."""
    if not torch.cuda.is_available():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
    except Exception:  # noqa: BLE001 - any failure means the provider cannot load
        return False
    return provider in session.get_providers()


def available_providers(requested: str | list[str] = "auto") -> list[str]:
    """``"auto"``: the GPU providers that load here, then CPU. A list is taken as given."""
    if requested != "auto":
        return [requested] if isinstance(requested, str) else list(requested)
    listed = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in listed and _provider_loads(p)] + ["CPUExecutionProvider"]


def _random_inputs(proto: onnx.ModelProto, batch_sizes: list[int]) -> list[list[np.ndarray]]:
    initializers = {i.name for i in proto.graph.initializer}
    batches = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        arrays = []
        for value in proto.graph.input:
            if value.name in initializers:
                continue
            t = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else b for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            arrays.append(rng.standard_normal(shape).astype(dtype))
        batches.append(arrays)
    return batches


def _session(path: str, provider: str, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def validate(
    onnx_path: str | os.PathLike,
    torch_model: nn.Module,
    inputs: list | None = None,
    *,
    providers: str | list[str] = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    repeat: int = 5,
) -> ValidationReport:
    """Run ``onnx_path`` on each provider and ``torch_model`` on the same inputs, and compare.

    ``inputs``: a list of batches, each a tensor or a tuple of tensors; by default random
    inputs of the file's input shapes at batch sizes 1 and 3.
    """
    path = str(onnx_path)
    proto = onnx.load(path, load_external_data=False)
    elem = proto.graph.input[0].type.tensor_type.elem_type
    dtype = "float16" if elem == onnx.TensorProto.FLOAT16 else "float32"
    tol = {**TOLERANCES[dtype], **({} if rtol is None else {"rtol": rtol}), **({} if atol is None else {"atol": atol})}
    if inputs is None:
        batches = _random_inputs(proto, [1, 3])
    else:
        batches = [[t.detach().cpu().numpy() for t in (b if isinstance(b, (tuple, list)) else (b,))] for b in inputs]
    expected = [_torch_outputs(torch_model.eval(), arrays) for arrays in batches]
    report = ValidationReport(path, dtype, tol, [b[0].shape[0] for b in batches])
    for provider in available_providers(providers):
        report.results.append(_run_provider(path, provider, batches, expected, tol, repeat))
    return report


@torch.no_grad()
def _torch_outputs(model: nn.Module, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on numpy inputs, float inputs cast to the model's own device and dtype."""
    param = next(model.parameters(), torch.empty(0))
    inputs = [torch.from_numpy(a).to(param.device, param.dtype if a.dtype.kind == "f" else None) for a in arrays]
    leaves = torch.utils._pytree.tree_leaves(model(*inputs))
    return [t.float().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor)]


def _run_provider(path, provider, batches, expected, tol, repeat) -> ProviderResult:
    session = _session(path, provider)
    names = [i.name for i in session.get_inputs()]
    max_abs = max_rel = 0.0
    cos_all, agree, count, times = [], 0, 0, []
    top1, passed = None, True
    for arrays, refs in zip(batches, expected):
        feed = dict(zip(names, arrays))
        outs = session.run(None, feed)
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        for out, ref in zip(outs, refs):
            out = out.astype(np.float64)
            ref = ref.astype(np.float64)
            err = float(np.abs(out - ref).max())
            scale = float(np.abs(ref).max()) or 1.0
            max_abs, max_rel = max(max_abs, err), max(max_rel, err / scale)
            passed = passed and err <= tol["atol"] + tol["rtol"] * float(np.abs(ref).max())
            a, b = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            cos_all.extend(cos.tolist())
            if ref.ndim == 2 and ref.shape[1] > 1:
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                count += ref.shape[0]
    if count:
        top1 = 100.0 * agree / count
    result = ProviderResult(
        provider, max_abs, max_rel, float(np.mean(cos_all)), top1, 1e3 * statistics.median(times), passed
    )
    if not passed:
        result.first_divergence = first_divergence(path, provider, dict(zip(names, batches[0])), tol)
    return result


def first_divergence(path: str, provider: str, feed: dict, tol: dict) -> str:
    """The first ``cosconvert`` node (graph order) whose runtime output differs from PyTorch's
    computation of that op on the same runtime inputs, as ``"name (op_type)"``."""
    proto = onnx.load(path)
    custom = [n for n in proto.graph.node if n.domain == DOMAIN]
    if not custom:
        return "unknown: the file has no cosconvert nodes to compare layer by layer (inlined?)"
    wanted = {name for n in custom for name in [*n.input, *n.output]}
    graph_io = {o.name for o in proto.graph.output}
    for name in sorted(wanted - graph_io - {i.name for i in proto.graph.initializer}):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        tapped = os.path.join(tmp, "tapped.onnx")
        onnx.save_model(proto, tapped)
        session = _session(tapped, provider)
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    values.update({i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer})
    for node in custom:
        x, w, b = (
            torch.tensor(np.asarray(values[i]), dtype=torch.float32) for i in node.input
        )  # a copy: initializers are read-only
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        centered, eps = bool(attrs["centered"]), float(attrs["eps"])
        if node.op_type == "CosineConv":
            dims = len(attrs["strides"])
            expected = CF.conv_normalized(
                x,
                w,
                b,
                attrs["strides"],
                attrs["pads"][:dims],
                attrs["dilations"],
                attrs["group"],
                centered=centered,
                eps=eps,
            )
        else:
            expected = CF.linear_normalized(x, w, b, centered=centered, eps=eps)
        got = torch.from_numpy(np.asarray(values[node.output[0]])).float()
        if (got - expected).abs().max() > tol["atol"] + tol["rtol"] * expected.abs().max():
            return f"{node.name} ({node.op_type})"
    return "none of the cosconvert nodes: look at the standard ops between them"
