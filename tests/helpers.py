"""What a converted model still computes as a plain dot product or normalizer, seen at run time."""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cosconvert.nn import CosineMultiheadAttention, _CosineMixin

DOT_PRODUCTS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
NORM_CALLS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm}
NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.RMSNorm,
)


def _caller() -> str:
    """The file that made the torch call, seen through cosconvert's pass-through mode (calls.py)."""
    frame = sys._getframe(2)
    while frame.f_code.co_filename.endswith(("cosconvert/calls.py", "torch/overrides.py")):
        frame = frame.f_back
    return frame.f_code.co_filename


class _Spy(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.dot_products, self.norms = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = _caller()
        if func in DOT_PRODUCTS and not caller.endswith("cosconvert/functional.py"):
            self.dot_products.append(f"{func.__name__} from {caller}")
        if func in NORM_CALLS:
            self.norms.append(func.__name__)
        return func(*args, **(kwargs or {}))


def plain_layers(model: nn.Module) -> list[str]:
    """Names of Linear/Conv/attention modules that are not cosine layers."""
    plain = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)
    return [
        n for n, m in model.named_modules()
        if isinstance(m, plain) and not isinstance(m, (_CosineMixin, CosineMultiheadAttention))
    ]  # fmt: skip


def norm_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


@torch.no_grad()
def run_and_spy(model: nn.Module, *inputs):
    """(output, plain dot-product calls, normalizer calls) of one forward."""
    with _Spy() as spy:
        out = model(*inputs)
    return out, spy.dot_products, spy.norms
