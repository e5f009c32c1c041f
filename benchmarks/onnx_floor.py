"""How fast could a converted network run on onnxruntime if its norms cost nothing?

    python benchmarks/onnx_floor.py [--repeat 200] [--threads 1 2] [--models resnet18 mobilenet_v3_small]

The floor network is the converted one with every cosine layer's ``1 / |x|`` replaced by a constant
(the values it takes on one fixed input): each layer runs ``Conv`` (or ``MatMul``) without bias, a
``Mul`` by that constant and the bias ``Add``. That is the least any graph can do that keeps
onnxruntime's own convolution and applies the norm after it, as the export does; only a convolution
kernel of our own that sums its input's squares as it reads them could go below it.

The *read floor* adds what any norm computed apart from the convolution must do at least: read the
layer's input once more. Each layer also sums its input over the channels (``ReduceSum``, no square,
no window), and the network returns those sums as extra outputs, so that nothing prunes them. No norm
built of onnxruntime's own nodes can cost less than that read; a kernel of our own might read faster
(``--channel-sum``).

Batch 1; the original, the converted network and the floors in one process, interleaved in blocks of
calls (see onnx_latency.py).

``--channel-sum`` times, instead, that read alone: onnxruntime's ``ReduceSum`` over the channels of one
input (a one-node graph) beside numpy's, at resnet18's four widths: how fast a kernel of our own could read.
"""

import argparse
import contextlib
import copy
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from _timing import compare
from onnx_latency import BLOCK, export_pair, session
from torch import nn

import cosconvert
from cosconvert.functional import inverse_norm, normalize_weight, receptive_field_inverse_norm, sum_of_squares


class FreeNorm(nn.Module):
    """A cosine layer's product with its normalized weight, scaled by a fixed ``1 / |x|`` (shape
    ``(1, C_out, *out)``, ``(1, 1, *out)`` or ``(1, 1)``), plus its bias: the layer once its input's
    norms are known. On the input they were taken from it computes what the layer does."""

    def __init__(self, layer: nn.Module, inverse_norm: torch.Tensor, reads: list | None = None) -> None:
        super().__init__()
        self.reads = reads  # where to put the input's channel sum (the read floor), if anywhere
        self.weight = nn.Parameter(normalize_weight(layer.weight, eps=layer.eps, gain=layer.gain).detach())
        self.bias = layer.bias
        self.conv = (
            None if isinstance(layer, nn.Linear) else (layer.stride, layer.padding, layer.dilation, layer.groups)
        )
        self.register_buffer("inverse_norm", inverse_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads is not None:
            self.reads.append(x.sum(1 if self.conv else -1))
        out = F.linear(x, self.weight) if self.conv is None else F.conv2d(x, self.weight, None, *self.conv)
        out = out * self.inverse_norm
        return out if self.bias is None else out + self.bias.view(-1, *[1] * (out.dim() - 2))


class ReadFloor(nn.Module):
    """A floor model whose layers also read their inputs once (:class:`FreeNorm`'s ``reads``): it
    returns the network's output and every layer's channel sum."""

    def __init__(self, floor: nn.Module, reads: list) -> None:
        super().__init__()
        self.floor, self.reads = floor, reads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.reads.clear()
        out = self.floor(x)
        return (out, *self.reads)


def floor_model(converted: nn.Module, example: torch.Tensor, read: bool = False) -> nn.Module:
    """A copy of ``converted`` with each cosine ``Linear`` and ``Conv2d`` swapped for :class:`FreeNorm`, holding
    the norms it meets on ``example``. Other cosine layers (attention) keep their norms. ``read``: the
    read floor (:class:`ReadFloor`), whose first output is the network's."""
    inputs = {}
    kinds = (cosconvert.nn.CosineLinear, cosconvert.nn.CosineConv2d)
    cosine = {n: m for n, m in converted.named_modules() if isinstance(m, kinds)}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in cosine.items()]
    with torch.no_grad():
        converted(example)
    for hook in hooks:
        hook.remove()
    floor, reads = copy.deepcopy(converted), [] if read else None
    for name, layer in cosine.items():
        if layer.centered or getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"{name}: the floor models plain cosine layers with zero padding only")
        x = inputs[name]
        if isinstance(layer, nn.Linear):
            inverse = inverse_norm(sum_of_squares(x, -1), layer.eps).unsqueeze(-1)
        else:
            inverse = receptive_field_inverse_norm(
                x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups, eps=layer.eps
            ).repeat_interleave(layer.out_channels // layer.groups, 1)
        parent, _, child = name.rpartition(".")
        setattr(floor.get_submodule(parent) if parent else floor, child, FreeNorm(layer, inverse, reads))
    return floor if reads is None else ReadFloor(floor, reads)


def channel_sums(repeat: int) -> None:
    """onnxruntime's ``ReduceSum`` over axis 1 (one thread) against numpy's, at resnet18's widths."""
    print(f"{'input':16} {'onnxruntime us':>15} {'GB/s':>5} {'numpy us':>9} {'GB/s':>5}")
    for shape in ([1, 64, 56, 56], [1, 128, 28, 28], [1, 256, 14, 14], [1, 512, 7, 7]):
        node = onnx.helper.make_node("ReduceSum", ["X", "axes"], ["Y"], keepdims=1)
        graph = onnx.helper.make_graph(
            [node], "channel_sum",
            [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, shape)],
            [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])],
        )  # fmt: skip
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        t = compare({"ort": lambda: s.run(None, {"X": x}), "numpy": lambda: x.sum(axis=1)}, repeat=repeat)
        gbs = {k: x.nbytes / v / 1e9 for k, v in t.items()}
        print(
            f"{'x'.join(map(str, shape[1:])):16} {t['ort'] * 1e6:15.0f} {gbs['ort']:5.1f}"
            f" {t['numpy'] * 1e6:9.0f} {gbs['numpy']:5.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads; 0: one per core")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--channel-sum", action="store_true", help="only the channel sums (see channel_sums())")
    args = parser.parse_args()
    if args.channel_sum:
        return channel_sums(args.repeat)
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, float32, batch 1, 224x224\n")
    print(
        f"{'model':20} {'threads':>7} {'original ms':>12} {'cosine':>7} {'floor':>7} {'read':>7}"
        "  nodes run (original, cosine, floor, read); floor - cosine"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            plain_path, cos_path = export_pair(name, Path(tmp))
            torch.manual_seed(0)  # the weights and input of export_pair's files
            model = torchvision.models.get_model(name).eval()
            example = torch.randn(1, 3, 224, 224)
            converted = cosconvert.convert(model, strip_norms="fold")
            floor, read = floor_model(converted, example), floor_model(converted, example, read=True)
            with torch.no_grad():
                expected = converted(example)
                gap = max((out - expected).abs().max().item() for out in (floor(example), read(example)[0]))
            floor_path, read_path = Path(tmp) / f"{name}-floor.onnx", Path(tmp) / f"{name}-read.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(floor, (example,), floor_path, dynamo=True)
                torch.onnx.export(read, (example,), read_path, dynamo=True)
            x = example.numpy()
            for threads in args.threads:
                runs, nodes = {}, []
                for label, path in (
                    ("plain", plain_path),
                    ("cos", cos_path),
                    ("floor", floor_path),
                    ("read", read_path),
                ):
                    s, count = session(path, threads)
                    runs[label] = lambda s=s: s.run(None, {s.get_inputs()[0].name: x})
                    nodes.append(count)
                t = compare(runs, repeat=max(args.repeat // BLOCK, 2), block=BLOCK)
                print(
                    f"{name:20} {threads or 'all':>7} {t['plain'] * 1e3:12.2f} {t['cos'] / t['plain']:6.2f}x"
                    f" {t['floor'] / t['plain']:6.2f}x {t['read'] / t['plain']:6.2f}x  {', '.join(map(str, nodes))}; {gap:.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
