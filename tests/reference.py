"""An independent float64 reference for cosine layers: unfold every receptive field explicitly.

Written for the tests from the definition alone; it shares no code with the package.
"""

import math

import torch
import torch.nn.functional as F

CONSTANT_TOL = 1e-5  # cosconvert's documented threshold for a constant centered field


def same_padding(kernel_size, dilation):
    """torch's 'same' convention: the extra odd pixel of padding goes after."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def cosine_reference(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, centered=False, eps=1e-6, gain=None):
    """Cosine (or Pearson) of every output unit's weight with its receptive field, float64.

    x: (N, C, *spatial), w: (O, C // groups, *k). Linear layers are the case of no spatial dims.
    """
    x, w = x.double(), w.double()
    dims = w.dim() - 2
    tup = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    stride, dilation, k = tup(stride), tup(dilation), w.shape[2:]
    if padding == "valid":
        pads = [(0, 0)] * dims
    elif padding == "same":
        pads = same_padding(k, dilation)
    else:
        pads = [(p, p) for p in tup(padding)]
    flat = [p for pair in reversed(pads) for p in pair]
    xp = F.pad(x, flat) if dims else x
    for i in range(dims):
        span = dilation[i] * (k[i] - 1) + 1
        xp = xp.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    # xp: (N, C, *out, *k) -> (N, *out, groups, C/groups * prod(k))
    n, c = x.shape[:2]
    out_shape = xp.shape[2 : 2 + dims]
    perm = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    fields = xp.permute(perm).reshape(n, *out_shape, groups, c // groups * math.prod(k))  # n may be 0
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    x_fields = fields
    if centered:
        fields = fields - fields.mean(-1, keepdim=True)
        wg = wg - wg.mean(-1, keepdim=True)
    dot = torch.einsum("n...gk,gok->n...go", fields, wg)
    den = fields.norm(dim=-1).clamp_min(eps).unsqueeze(-1) * wg.norm(dim=-1).clamp_min(eps)
    if centered:  # the documented rule: a field with std under ~0.3% of its RMS counts as constant
        raw = x_fields.square().sum(-1)
        dot = dot * (fields.square().sum(-1) > CONSTANT_TOL * raw).unsqueeze(-1)
    cos = (dot / den).reshape(n, *out_shape, w.shape[0])
    if gain is not None:
        cos = cos * gain.double()
    if bias is not None:
        cos = cos + bias.double()
    return cos.movedim(-1, 1)


def linear_reference(x, w, bias=None, centered=False, eps=1e-6, gain=None):
    """Cosine linear layer, float64: x (..., in), w (out, in)."""
    lead = x.shape[:-1]
    out = cosine_reference(x.reshape(-1, x.shape[-1]), w, bias, centered=centered, eps=eps, gain=gain)
    return out.reshape(*lead, w.shape[0])
