"""Where a float32 conversion's distance from the float64 judge comes from (issue 27).

For each model named (as in ``benchmarks/sweep.py``), side by side on the same inputs:

- ``converted``: the converted model in float32 against the float64 judge (relative to the
  output's largest value);
- ``judge in float32``: the original in float32 with every layer's cosine computed exactly (float64)
  and rounded to float32, against the same judge: the best a float32 network can do;
- ``ratio``: the two over each other;
- ``worst layer``: the largest error of one cosine conv/linear call of the converted model against
  the float64 cosine of the very input it received (relative to that call's largest output).

A worst layer at float32 rounding (1e-7) with a large network error means the network amplifies
rounding (the judge in float32 shows the same), not that a layer loses precision.

    python benchmarks/precision.py MobileNetV1Model repghostnet_050 legacy_xception
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402
from faithful_reference import CosineReference, reference_outputs  # noqa: E402
from reference import cosine_reference, linear_reference  # noqa: E402
from test_faithful import liven  # noqa: E402

import cosconvert  # noqa: E402
from cosconvert import functional as CF  # noqa: E402


class _LayerErrors:
    """Wraps the cosine math every cosine conv and linear call ends in (``conv_normalized``,
    ``linear_normalized``), recording each call's error against the float64 cosine of its own input."""

    def __init__(self) -> None:
        self.worst = 0.0

    def _note(self, out: torch.Tensor, ref: torch.Tensor) -> None:
        self.worst = max(self.worst, float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))

    @staticmethod
    def _scaled(cos: torch.Tensor, weight: torch.Tensor, bias, unit_scale, dim: int) -> torch.Tensor:
        """The call's output from the float64 cosines: ``cos * |w| * unit_scale + bias`` per unit."""
        scale = weight.double().flatten(1).norm(dim=1)
        scale = scale if unit_scale is None else scale * unit_scale.double()
        shape = [1] * cos.dim()
        shape[dim] = -1
        out = cos * scale.view(shape)
        return out if bias is None else out + bias.double().view(shape)

    def __enter__(self):
        self.conv, self.linear = CF.conv_normalized, CF.linear_normalized

        def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, centered=False, eps=1e-6,
                 unit_scale=None):  # fmt: skip
            out = self.conv(input, weight, bias, stride, padding, dilation, groups, centered=centered, eps=eps,
                            unit_scale=unit_scale)  # fmt: skip
            if not centered and input.dim() == weight.dim():
                cos = cosine_reference(input.double(), weight.double(), None, stride, padding, dilation, groups, eps=eps)
                self._note(out, self._scaled(cos, weight, bias, unit_scale, 1))
            return out

        def linear(input, weight, bias=None, *, centered=False, eps=1e-6, unit_scale=None):
            out = self.linear(input, weight, bias, centered=centered, eps=eps, unit_scale=unit_scale)
            if not centered:
                cos = linear_reference(input.double(), weight.double(), eps=eps)
                self._note(out, self._scaled(cos, weight, bias, unit_scale, -1))
            return out

        CF.conv_normalized, CF.linear_normalized = conv, linear
        return self

    def __exit__(self, *exc) -> None:
        CF.conv_normalized, CF.linear_normalized = self.conv, self.linear


class _Float64Layers:
    """Every cosine conv and linear call computed in float64 and rounded to its float32 output: the
    converted network with its layers' own arithmetic exact."""

    def __enter__(self):
        self.conv, self.linear = CF.conv_normalized, CF.linear_normalized

        def exact(fn):
            def call(input, weight, bias=None, *args, **kwargs):
                kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                out = fn(input.double(), weight.double(), None if bias is None else bias.double(), *args, **kwargs)
                return out.to(torch.promote_types(input.dtype, weight.dtype))

            return call

        CF.conv_normalized, CF.linear_normalized = exact(self.conv), exact(self.linear)
        return self

    def __exit__(self, *exc) -> None:
        CF.conv_normalized, CF.linear_normalized = self.conv, self.linear


def measure(name: str) -> dict:
    cases = {**sweep.transformers_cases(), **sweep.torchvision_cases()}
    build = cases.get(name) or (lambda: sweep._timm(name))
    torch.manual_seed(0)
    model, args, kwargs = build()
    model = liven(model).eval()
    converted = cosconvert.convert(model, gain="none").eval()
    ref, _ = reference_outputs(model, *args, **kwargs)
    with torch.no_grad(), _LayerErrors() as layers:
        out = converted(*args, **kwargs)
    with torch.no_grad(), CosineReference():  # float32 model, each cosine exact then rounded to float32
        judge32 = copy.deepcopy(model)(*args, **kwargs)
    with torch.no_grad(), _Float64Layers():
        exact = converted(*args, **kwargs)
    row = {"model": name, "converted": sweep._rel(out, ref), "judge_f32": sweep._rel(judge32, ref),
           "layers_f64": sweep._rel(exact, ref)}  # fmt: skip
    row["ratio"] = row["converted"] / max(row["judge_f32"], 1e-30)
    row["worst_layer"] = layers.worst
    return row


def main(names: list[str]) -> None:
    print(f"{'model':32} {'converted':>10} {'judge f32':>10} {'ratio':>8} {'worst layer':>12} {'layers f64':>11}")
    for name in names:
        r = measure(name)
        print(f"{name:32} {r['converted']:10.2e} {r['judge_f32']:10.2e} {r['ratio']:8.1f} {r['worst_layer']:12.1e} "
              f"{r['layers_f64']:11.2e}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["PPOCRV5MobileRecModel", "lcnetv2_small", "MobileNetV1Model", "repghostnet_050",
                          "legacy_xception", "vovnet39a"])
