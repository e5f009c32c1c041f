"""Check an exported file, and say what the check can and cannot vouch for.

Two questions, answered apart:

- **Fidelity to the original**: how close the converted PyTorch model is to the network it was
  converted from (output cosine, top-1 agreement, max relative error), on the inputs given.
  A converted network is a different function until it is fine-tuned; this is measured, not judged.
- **ONNX parity**: whether the file computes what the converted PyTorch model computes, on every
  runtime at hand. This is the pass/fail verdict.

Parity tolerances depend on the file's float type (float32: ``rtol=1e-4, atol=1e-5``; float16:
``rtol=atol=1e-2``) and on the model's own conditioning: the converted model is run in float64 on
the same inputs, and the file passes when its largest absolute error is at most
``atol + max(rtol, SPREAD_FACTOR * spread) * max|reference|``, where ``spread`` is PyTorch's own
float-vs-float64 relative error. "Relative error" is the largest absolute error over the largest
reference magnitude, which stays meaningful where single outputs are near zero.

Outputs that cannot tell a right file from a wrong one (non-finite, all zero, constant, or the
same for different inputs, from the converted model or the original) make the verdict
``inconclusive``, never ``pass``, with the reason.

Each provider's row also says how many of the nodes onnxruntime ran were on that provider, read
from its profiler on the first batch: a pass on a GPU provider whose nodes fell back to the CPU
says so.

On failure the report names the first node that diverges: every ``cosconvert`` node's
output in the runtime is compared with PyTorch's :func:`cosconvert.functional.conv_normalized`
/ ``linear_normalized`` on the same node inputs, in graph order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from cosconvert import functional as CF
from cosconvert.agreement import Agreement
from cosconvert.errors import first_line
from cosconvert.onnx.functions import DOMAIN

__all__ = ["validate", "fidelity", "ValidationReport", "available_providers", "TOLERANCES", "SPREAD_FACTOR"]

TOLERANCES = {"float32": {"rtol": 1e-4, "atol": 1e-5}, "float16": {"rtol": 1e-2, "atol": 1e-2}}
SPREAD_FACTOR = 4.0  # parity is judged against at least this multiple of PyTorch's own float-vs-float64 spread
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
    nodes_on_provider: str | None = None  # "707/780 (CPU Concat 20, ...)": nodes run there / all run
    not_run: str | None = None  # why the provider ran none of the file: unknown, not loaded, or no node on it


@dataclass
class ValidationReport:
    """``results``: ONNX parity per provider. ``fidelity``: converted against original (with ``original=``).
    ``spread``: the converted model's own float-vs-float64 relative error; ``parity_tolerance`` the
    tolerance parity was judged against. ``inconclusive``: why the outputs cannot vouch for the file."""

    path: str
    dtype: str
    tolerance: dict
    batch_sizes: list[int]
    inputs: str = "random inputs"
    results: list[ProviderResult] = field(default_factory=list)
    fidelity: dict | None = None
    spread: float | None = None
    parity_tolerance: dict = field(default_factory=dict)
    inconclusive: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``"fail"`` if any runtime differs beyond tolerance, else ``"inconclusive"`` if the outputs
        cannot tell (see ``inconclusive``), else ``"pass"``."""
        if not self.results or not all(r.passed for r in self.results):
            return "fail"
        return "inconclusive" if self.inconclusive else "pass"

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict:
        d = asdict(self)
        for row in d["results"]:  # a provider that ran nothing has no figures: null, not NaN
            row.update({k: None for k, v in row.items() if isinstance(v, float) and math.isnan(v)})
        return {**d, "status": self.status, "passed": self.passed}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    def __str__(self) -> str:
        lines = [f"{self.path} ({self.dtype}, batches {self.batch_sizes}, on {self.inputs})"]
        if self.fidelity is not None:
            f = self.fidelity
            top1 = "-" if f["top1_agreement"] is None else f"{f['top1_agreement']:.1f}%"
            lines.append(
                f"fidelity to the original (converted vs original PyTorch): output cosine {f['cosine']:.6f}, "
                f"top-1 agreement {top1}, max rel error {f['max_rel_error']:.2e}"
            )
        spread = "not measured" if self.spread is None else f"{self.spread:.2e}"
        tol = self.parity_tolerance or self.tolerance
        lines.append(
            f"conditioning: converted model float vs float64 max rel {spread}; "
            f"parity tolerance rtol {tol['rtol']:.1e}, atol {tol['atol']:.1e}"
        )
        head = (
            f"{'ONNX parity: provider':28} {'max abs':>10} {'max rel':>10} {'cosine':>9} {'top-1 %':>8} {'ms':>8}  "
            f"{'nodes on it':>11}  result"
        )
        lines += [head, "-" * len(head)]
        for r in self.results:
            top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.1f}"
            if r.not_run:
                lines.append(
                    f"{r.provider:28} {'-':>10} {'-':>10} {'-':>9} {'-':>8} {'-':>8}  {'-':>11}  FAIL: {r.not_run}"
                )
                continue
            verdict = "pass" if r.passed else f"FAIL (first divergence: {r.first_divergence})"
            lines.append(
                f"{r.provider:28} {r.max_abs_error:10.2e} {r.max_rel_error:10.2e} {r.cosine:9.6f} {top1:>8} "
                f"{r.latency_ms:8.2f}  {r.nodes_on_provider or '-':>11}  {verdict}"
            )
        verdict = self.status + (f": {'; '.join(self.inconclusive)}" if self.status == "inconclusive" else "")
        lines.append(f"validation: {verdict}")
        return "\n".join(lines)


def _probe_model() -> bytes:
    """A one-node file (Relu) that any onnxruntime since 1.14 loads: onnx's newest IR version is
    often newer than the installed runtime reads, which would make every provider look absent."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    return onnx.helper.make_model(
        graph, ir_version=8, opset_imports=[onnx.helper.make_opsetid("", 17)]
    ).SerializeToString()


def _provider_loads(provider: str) -> bool:
    """Whether ``provider`` really runs here (onnxruntime-gpu lists CUDA even without a GPU)."""
    if not torch.cuda.is_available():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(_probe_model(), options, providers=[provider])
    except Exception:  # noqa: BLE001 - any failure means the provider cannot load
        return False
    return provider in session.get_providers()


def available_providers(requested: str | list[str] = "auto") -> list[str]:
    """``"auto"``: the GPU providers that load here, then CPU. A list (or comma-separated names) is
    taken as given: each is validated, and one that ran nothing fails."""
    if requested != "auto":
        return [p.strip() for p in requested.split(",")] if isinstance(requested, str) else list(requested)
    listed = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in listed and _provider_loads(p)] + ["CPUExecutionProvider"]


def _random_inputs(proto: onnx.ModelProto, batch_sizes: list[int], high: int) -> list[list[np.ndarray]]:
    """Seeded random inputs of the file's shapes: normal floats, integer ids in ``[0, high)``."""
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
            if np.issubdtype(dtype, np.integer):
                arrays.append(rng.integers(0, high, shape).astype(dtype))
            else:
                arrays.append(rng.standard_normal(shape).astype(dtype))
        batches.append(arrays)
    return batches


def _session(path: str, provider: str, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if provider == "CUDAExecutionProvider":  # its MatMul and Conv default to TF32, 10 mantissa bits: not float32
        providers[0] = (provider, {"use_tf32": "0"})
    options = options or ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    return ort.InferenceSession(path, options, providers=providers)


def _input_types(proto: onnx.ModelProto) -> list[np.dtype]:
    initializers = {i.name for i in proto.graph.initializer}
    return [
        onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        for v in proto.graph.input
        if v.name not in initializers
    ]


def _fixed_batch(proto: onnx.ModelProto) -> int | None:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def _to_batch(batches: list[list[np.ndarray]], size: int) -> list[list[np.ndarray]]:
    """One batch of exactly ``size`` samples from the given ones (a file exported with a fixed batch)."""
    rows = [np.concatenate([b[k] for b in batches]) for k in range(len(batches[0]))]
    index = np.arange(size) % rows[0].shape[0]
    return [[r[index] for r in rows]]


def validate(
    onnx_path: str | os.PathLike,
    torch_model: nn.Module,
    inputs: list | None = None,
    *,
    original: nn.Module | None = None,
    inputs_name: str | None = None,
    providers: str | list[str] = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    repeat: int = 5,
) -> ValidationReport:
    """Run ``onnx_path`` on each provider and ``torch_model`` (the converted model) on the same
    inputs, and compare; with ``original``, also measure the converted model's fidelity to it.

    ``inputs``: a list of batches, each a tensor, a tuple of tensors or a dict of tensors named as
    the file's inputs (passed to the models by keyword: a file exported from a dict); by default random
    inputs of the file's input shapes at batch sizes 1 and 3 (``inputs_name`` says in the
    report what they are). A file with a fixed batch is fed that batch size. Prints nothing.
    """
    path = str(onnx_path)
    proto = onnx.load(path, load_external_data=False)
    elem = proto.graph.input[0].type.tensor_type.elem_type
    dtype = "float16" if elem == onnx.TensorProto.FLOAT16 else "float32"
    tol = {**TOLERANCES[dtype], **({} if rtol is None else {"rtol": rtol}), **({} if atol is None else {"atol": atol})}
    names = None
    if inputs is None:
        from cosconvert.inputs import vocabulary

        batches = _random_inputs(proto, [1, 3], vocabulary(torch_model) or 2)  # token ids inside the vocabulary
    else:
        names, batches = _arrays(inputs, _input_names(proto))
        inputs_name = inputs_name or "the inputs given"
    types = _input_types(proto)  # a float16 file takes float16 inputs
    batches = [[a.astype(t) if a.dtype.kind == "f" else a for a, t in zip(arrays, types)] for arrays in batches]
    if (fixed := _fixed_batch(proto)) and any(b[0].shape[0] != fixed for b in batches):
        batches = _to_batch(batches, fixed)
    expected = [_torch_outputs(torch_model.eval(), arrays, names) for arrays in batches]
    spread = _spread(torch_model, batches, expected, names)
    parity = {**tol, "rtol": max(tol["rtol"], SPREAD_FACTOR * spread)} if spread is not None else dict(tol)
    report = ValidationReport(path, dtype, tol, [b[0].shape[0] for b in batches], inputs_name or "random inputs",
                              spread=spread, parity_tolerance=parity)  # fmt: skip
    report.inconclusive = _degenerate("the converted model", batches, expected)
    if original is not None:
        from_original = [_torch_outputs(original.eval(), arrays, names) for arrays in batches]
        report.inconclusive += _degenerate("the original", batches, from_original)
        report.fidelity = _fidelity(expected, from_original)
    for provider in available_providers(providers):
        report.results.append(_run_provider(path, provider, batches, expected, parity, repeat))
    return report


def _input_names(proto: onnx.ModelProto) -> list[str]:
    initializers = {i.name for i in proto.graph.initializer}
    return [v.name for v in proto.graph.input if v.name not in initializers]


def _arrays(inputs: list, file_names: list[str] | None = None) -> tuple[list[str] | None, list[list[np.ndarray]]]:
    """(keyword names or None, numpy arrays per batch, in the file's input order) of a list of batches,
    each a tensor, a tuple of positional tensors or a dict of keyword tensors named as the file's inputs."""
    names = list(inputs[0]) if isinstance(inputs[0], dict) else None
    if names is not None and file_names is None:
        file_names = names
    if names is not None and sorted(names) != sorted(file_names):
        raise ValueError(
            f"the inputs are named {', '.join(names)} but the file takes {', '.join(file_names)}: "
            "give one tensor per input of the file, named as the file names it"
        )
    names = file_names if names is not None else None
    batches = [[b[n] for n in names] if names else list(b if isinstance(b, (tuple, list)) else (b,)) for b in inputs]
    return names, [[t.detach().cpu().numpy() for t in batch] for batch in batches]


@contextlib.contextmanager
def _float32_exact() -> Iterator[None]:
    """PyTorch's CUDA convs (and matmuls, where enabled) without TF32: the reference is float32's own."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


@torch.no_grad()
def _torch_outputs(model: nn.Module, arrays: list[np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    """The model's outputs (float64 numpy) on numpy inputs, float inputs cast to the model's own device and
    dtype; passed by keyword when ``names`` are given, else by position."""
    param = next(model.parameters(), torch.empty(0))
    inputs = [torch.from_numpy(a).to(param.device, param.dtype if a.dtype.kind == "f" else None) for a in arrays]
    with _float32_exact():
        outputs = model(**dict(zip(names, inputs))) if names else model(*inputs)
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [t.double().cpu().numpy() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _spread(model: nn.Module, batches, expected, names=None) -> float | None:
    """The largest relative difference between ``model`` in its own precision and a float64 copy of it."""
    try:
        double = copy.deepcopy(model).double()
        worst = 0.0
        for arrays, refs in zip(batches, expected):
            for ref, exact in zip(refs, _torch_outputs(double, arrays, names)):
                scale = float(np.abs(exact).max()) or 1.0
                worst = max(worst, float(np.abs(ref - exact).max()) / scale)
        return worst if np.isfinite(worst) else None
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 is judged at the plain tolerance
        return None


def _degenerate(whose: str, batches, outputs) -> list[str]:
    """Why ``outputs`` (per batch, per output) cannot tell a right file from a wrong one, if they cannot."""
    reasons = []
    for k in range(len(outputs[0])):
        name = whose if len(outputs[0]) == 1 else f"{whose} (output {k})"
        flat = np.concatenate([out[k].ravel() for out in outputs])
        if not np.isfinite(flat).all():
            reasons.append(f"{name} gives non-finite outputs (NaN or inf)")
        elif not flat.any():
            reasons.append(f"every output of {name} is exactly 0")
        elif flat.max() - flat.min() <= 1e-6 * np.abs(flat).max():
            reasons.append(f"every output of {name} has the same value ({flat[0]:.6g})")
        elif _same_for_different_inputs(batches, [out[k] for out in outputs]):
            reasons.append(f"{name} gives the same output for different inputs")
    return reasons


def _same_for_different_inputs(batches, outputs) -> bool:
    """Whether every sample whose input differs from its batch's first gets the first one's output."""
    compared = False
    for arrays, out in zip(batches, outputs):
        x = arrays[0].reshape(arrays[0].shape[0], -1)
        if out.ndim == 0 or out.shape[0] != x.shape[0]:
            continue
        y = out.reshape(out.shape[0], -1)
        scale = float(np.abs(y).max()) or 1.0
        for i in range(1, x.shape[0]):
            if np.array_equal(x[i], x[0]):
                continue
            compared = True
            if np.abs(y[i] - y[0]).max() > 1e-6 * scale:
                return False
    return compared


def fidelity(converted: nn.Module, original: nn.Module, inputs: list) -> dict:
    """How close ``converted`` is to ``original`` on ``inputs`` (a list of batches, each a tensor, a
    tuple of tensors or a dict of keyword tensors): ``cosine`` (of each sample's outputs, averaged), ``top1_agreement`` (%, for
    class scores, else None), ``max_rel_error``, and ``inconclusive``: why the outputs cannot tell
    (constant, zero, non-finite, the same for different inputs), empty when they can."""
    names, batches = _arrays(inputs)
    ours = [_torch_outputs(converted.eval(), arrays, names) for arrays in batches]
    theirs = [_torch_outputs(original.eval(), arrays, names) for arrays in batches]
    reasons = _degenerate("the converted model", batches, ours) + _degenerate("the original", batches, theirs)
    return {**_fidelity(ours, theirs), "inconclusive": reasons}


def _fidelity(converted, original) -> dict:
    """Output cosine (mean over outputs of the mean over samples), top-1 agreement (%, of the first
    output where it holds class scores, else None; :class:`~cosconvert.agreement.Agreement`) and max
    relative error of converted against original, each a list (per batch) of lists of output arrays."""
    runs = [Agreement() for _ in original[0]]
    worst = 0.0
    for outs, refs in zip(converted, original):
        for run, out, ref in zip(runs, outs, refs):
            worst = max(worst, float(np.abs(out - ref).max()) / (float(np.abs(ref).max()) or 1.0))
            run.add(torch.from_numpy(np.asarray(ref)), torch.from_numpy(np.asarray(out)))
    results = [run.result(rounded=False) for run in runs]
    return {"cosine": float(np.mean([r["output_cosine"] for r in results])),
            "top1_agreement": results[0].get("top1_agreement"), "max_rel_error": worst}  # fmt: skip


def _placement(profile: str, provider: str) -> tuple[str, int]:
    """From an onnxruntime profile: "on/all" nodes run on ``provider``, with the others by op type,
    and the count run on it."""
    events = json.loads(Path(profile).read_text())
    ran = {e["name"]: e["args"] for e in events if e.get("cat") == "Node" and "provider" in e.get("args", {})}
    here = provider.removesuffix("ExecutionProvider")
    by_place = Counter((a["provider"].removesuffix("ExecutionProvider"), a["op_name"]) for a in ran.values())
    on = sum(n for (where, _), n in by_place.items() if where == here)
    others = ", ".join(f"{where} {op} {n}" for (where, op), n in by_place.most_common() if where != here)
    return f"{on}/{len(ran)}" + (f" ({others})" if others else ""), on


def _not_run(provider: str, reason: str) -> ProviderResult:
    """A provider asked for that ran nothing: a failure, never a pass."""
    nan = float("nan")
    return ProviderResult(provider, nan, nan, nan, None, nan, False, None, None, not_run=reason)


def _run_provider(path, provider, batches, expected, tol, repeat) -> ProviderResult:
    if provider not in ort.get_all_providers():
        return _not_run(provider, f"not loaded: onnxruntime knows no provider of this name (known: "
                                  f"{', '.join(p.removesuffix('ExecutionProvider') for p in ort.get_available_providers())})")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True  # the first run only: where each node ran
        options.profile_file_prefix = str(Path(tmp) / "profile")
        try:
            session = _session(path, provider, options)
        except Exception as err:  # noqa: BLE001 - a provider that cannot start ran nothing
            return _not_run(provider, f"not loaded: {first_line(err)[:200]}")
        if provider not in session.get_providers():
            return _not_run(provider, "not loaded: onnxruntime fell back to the CPU (this build or machine lacks it)")
        names = [i.name for i in session.get_inputs()]
        first = session.run(None, dict(zip(names, batches[0])))
        placement, on = _placement(session.end_profiling(), provider)
    if on == 0:
        return _not_run(provider, f"ran none of the file's nodes ({placement})")
    max_abs, ran, times, passed = 0.0, [], [], True
    for i, (arrays, refs) in enumerate(zip(batches, expected)):
        feed = dict(zip(names, arrays))
        outs = [o.astype(np.float64) for o in (first if i == 0 else session.run(None, feed))]
        ran.append(outs)
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        for out, ref in zip(outs, refs):
            err = float(np.abs(out - ref).max())
            max_abs = max(max_abs, err)
            passed = passed and err <= tol["atol"] + tol["rtol"] * float(np.abs(ref).max())
    close = _fidelity(ran, expected)
    latency = 1e3 * statistics.median(times)
    result = ProviderResult(provider, max_abs, close["max_rel_error"], close["cosine"], close["top1_agreement"],
                            latency, passed, None, placement)  # fmt: skip
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
