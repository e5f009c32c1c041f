"""Cosine-normalized layers: drop-in subclasses of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
``nn.MultiheadAttention`` (Luo et al., 2017, "Cosine Normalization").

Each class keeps its torch parent's constructor signature and ``state_dict`` keys (plus
``gain`` when it has one), so weights load both ways, and adds three keyword arguments:

- ``centered``: Pearson correlation instead of cosine (weight and input minus their means);
- ``gain``: ``"none"`` (the paper's form, output ``cos + bias``), ``"scalar"`` or
  ``"channel"`` (a learnable gain ``g``, one or one per output unit: ``g * cos + bias``);
- ``eps``: the floor of each norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosconvert import functional as CF
from cosconvert.config import GAINS

__all__ = [
    "CosineLinear",
    "CosineConv1d",
    "CosineConv2d",
    "CosineConv3d",
    "CosineMultiheadAttention",
    "GAINS",
]


def _make_gain(gain: str, units: int, like: Tensor) -> nn.Parameter | None:
    if gain not in GAINS:
        raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
    if gain == "none":
        return None
    return nn.Parameter(torch.ones(1 if gain == "scalar" else units, device=like.device, dtype=like.dtype))


def _gain_mode(gain: Tensor | None) -> str:
    return "none" if gain is None else ("scalar" if gain.numel() == 1 else "channel")


class _CosineMixin:
    """What every cosine layer shares: its settings, its gain, and building it from a torch layer."""

    weight: Tensor
    gain: nn.Parameter | None

    def _init_cosine(self, centered: bool, gain: str, eps: float) -> None:
        self.centered = centered
        self.eps = eps
        self.gain = _make_gain(gain, self._gain_units(), self.weight)

    def _gain_units(self) -> int:
        return self.weight.shape[0]

    prenormalized = False

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.double()``... also move what ``convert`` stashed beside the layer:
        its original bias and the normalizer it stripped after it (calibration's target). They are
        kept out of the module tree so that they are neither trained nor saved."""
        stripped = self.__dict__.get("_stripped_norm")
        if stripped is not None:
            bias, norm = stripped
            moved = (None if bias is None else fn(bias), None if norm is None else norm._apply(fn))
            object.__setattr__(self, "_stripped_norm", moved)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def prenormalize(self) -> None:
        """Replace the weight by its normalized form (gain folded in), for inference and export:
        forward then skips the per-call weight normalization. Not for training. A new tensor, not
        written over the old: a weight tied elsewhere (an embedding and its LM head) stays as it is."""
        if not self.prenormalized:
            normalized = CF.normalize_weight(self.weight, centered=self.centered, eps=self.eps, gain=self.gain)
            self.weight = nn.Parameter(normalized.detach(), requires_grad=False)
            self.gain, self.prenormalized = None, True

    def set_gain(self, gain: str) -> None:
        """Switch the gain mode, keeping a learned gain's values where the shapes allow."""
        old = self.gain
        self.gain = _make_gain(gain, self._gain_units(), next(self.parameters()))
        if old is not None and self.gain is not None:
            with torch.no_grad():
                self.gain.copy_(old.mean() if self.gain.numel() == 1 else old.expand_as(self.gain))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A plain torch layer's state_dict has no gain: keep ours (ones) rather than fail.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "gain" in missing_keys:
            missing_keys.remove(prefix + "gain")

    def extra_repr(self) -> str:
        settings = f"centered={self.centered}, gain={_gain_mode(self.gain)!r}, eps={self.eps:g}"
        return f"{super().extra_repr() or self.embed_dim}, {settings}"


class CosineLinear(_CosineMixin, nn.Linear):
    """``nn.Linear`` whose output ``j`` is ``gain * cos(w_j, x) + bias_j``. Input ``(..., in)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        centered: bool = False,
        gain: str = "none",
        eps: float = 1e-6,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_cosine(centered, gain, eps)

    def forward(self, input: Tensor) -> Tensor:
        if self.prenormalized:
            return CF.linear_normalized(input, self.weight, self.bias, centered=self.centered, eps=self.eps)
        return CF.cosine_linear(input, self.weight, self.bias, centered=self.centered, eps=self.eps, gain=self.gain)

    @classmethod
    def from_module(cls, module: nn.Linear, *, share: bool = False, **kwargs) -> CosineLinear:
        """The cosine twin of ``module``, on its device and dtype, with a copy of its weight and bias
        (``share``: the same parameters, no copy; :func:`cosconvert.convert` shares those of its own copy)."""
        args = (module.in_features, module.out_features, module.bias is not None)
        return _twin(cls, module, args, share, **kwargs)


def _twin(cls: type, source: nn.Module, args: tuple, share: bool, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` holding ``source``'s weight and bias (copied, or the same parameters
    where ``share``), its gain at one; built on the meta device, so no weight is allocated twice."""
    w = source.weight
    twin = cls(*args, device="meta", dtype=w.dtype, **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias"):
            param = getattr(source, name)
            if isinstance(param, nn.Parameter) and share:
                setattr(twin, name, param)
            elif param is not None:  # a copy; a parametrized weight (weight_norm) is computed, then kept
                setattr(twin, name, nn.Parameter(param.detach().clone(), param.requires_grad))
    if twin.gain is not None:
        twin.gain = nn.Parameter(torch.ones(twin.gain.shape, device=w.device, dtype=w.dtype))
    twin.train(source.training)
    return twin


class _CosineConvNd(_CosineMixin):
    _cosine_conv = staticmethod(CF.cosine_conv2d)

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if self.prenormalized:
            args = (input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
            return CF.conv_normalized(*args, centered=self.centered, eps=self.eps)
        return self._cosine_conv(
            input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
            centered=self.centered, eps=self.eps, gain=self.gain,
        )  # fmt: skip

    @classmethod
    def from_module(cls, module: nn.modules.conv._ConvNd, *, share: bool = False, **kwargs):
        """The cosine twin of ``module``, on its device and dtype, with a copy of its weight and bias
        (``share``: the same parameters, no copy)."""
        if module.transposed:
            raise TypeError("transposed convolutions have no receptive field to normalize")
        m = module
        args = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                m.bias is not None, m.padding_mode)  # fmt: skip
        return _twin(cls, module, args, share, **kwargs)


def _conv_class(parent: type, conv, dims: int) -> type:
    """One class per dimension, each with ``parent``'s exact constructor signature."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        centered: bool = False,
        gain: str = "none",
        eps: float = 1e-6,
    ) -> None:
        parent.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype,
        )  # fmt: skip
        self._init_cosine(centered, gain, eps)

    name = f"CosineConv{dims}d"
    doc = f"``nn.Conv{dims}d`` whose output is ``gain * cos(w_j, x) + bias_j`` over each receptive field ``x``."
    return type(name, (_CosineConvNd, parent), {
        "__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name,
        "_cosine_conv": staticmethod(conv),
    })  # fmt: skip


CosineConv1d = _conv_class(nn.Conv1d, CF.cosine_conv1d, 1)
CosineConv2d = _conv_class(nn.Conv2d, CF.cosine_conv2d, 2)
CosineConv3d = _conv_class(nn.Conv3d, CF.cosine_conv3d, 3)


class CosineMultiheadAttention(_CosineMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose input and output projections are cosine layers.

    The forward is written out (projections, then ``scaled_dot_product_attention``) so the
    projections are visible to autograd, fx and export; ``gain`` holds the input
    projections' gain (``3 * embed_dim`` units) and ``out_proj`` is a :class:`CosineLinear`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        centered: bool = False,
        gain: str = "none",
        eps: float = 1e-6,
    ) -> None:
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("add_bias_kv and add_zero_attn are not supported by cosine attention")
        super().__init__(embed_dim, num_heads, dropout, bias, False, False, kdim, vdim, batch_first, device, dtype)
        self.centered, self.eps = centered, eps
        self.gain = _make_gain(gain, self._gain_units(), self.out_proj.weight)
        self.out_proj = CosineLinear.from_module(self.out_proj, centered=centered, gain=gain, eps=eps)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, *, share: bool = False, **kwargs) -> CosineMultiheadAttention:
        """The cosine twin of ``module``, with a copy of its weights, device and dtype (``share``: its
        parameters, no copy)."""
        m = module
        w = m.out_proj.weight
        twin = torch.nn.utils.skip_init(
            cls, m.embed_dim, m.num_heads, m.dropout, m.in_proj_bias is not None, m.bias_k is not None,
            m.add_zero_attn, m.kdim, m.vdim, m.batch_first, device=w.device, dtype=w.dtype, **kwargs,
        )  # fmt: skip
        for layer in twin.modules():  # out_proj has a gain too
            if getattr(layer, "gain", None) is not None:
                torch.nn.init.ones_(layer.gain)
        twin.load_state_dict(m.state_dict(), assign=share)
        twin.train(m.training)
        return twin

    def _gain_units(self) -> int:
        return 3 * self.embed_dim

    @torch.no_grad()
    def prenormalize(self) -> None:
        if self.prenormalized:
            return
        normalized = [CF.normalize_weight(w, centered=self.centered, eps=self.eps, gain=g).detach()
                      for w, _, g in map(self._projection, range(3))]  # fmt: skip
        if self._qkv_same_embed_dim:  # new tensors, as for a linear layer
            self.in_proj_weight = nn.Parameter(torch.cat(normalized), requires_grad=False)
        else:
            for name, weight in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), normalized):
                setattr(self, name, nn.Parameter(weight, requires_grad=False))
        self.gain, self.prenormalized = None, True
        self.out_proj.prenormalize()

    def _projection(self, index: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Weight, bias and gain of the query (0), key (1) or value (2) projection."""
        rows = slice(index * self.embed_dim, (index + 1) * self.embed_dim)
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight[rows]
        else:
            weight = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[index]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        gain = None if self.gain is None else (self.gain if self.gain.numel() == 1 else self.gain[rows])
        return weight, bias, gain

    def _project(self, x: Tensor, index: int) -> Tensor:
        weight, bias, gain = self._projection(index)
        if self.prenormalized:
            return CF.linear_normalized(x, weight, bias, centered=self.centered, eps=self.eps)
        return CF.cosine_linear(x, weight, bias, centered=self.centered, eps=self.eps, gain=gain)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:  # to (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        def split(x: Tensor) -> Tensor:  # (N, L, E) -> (N, heads, L, head_dim)
            return x.reshape(n, -1, heads, head_dim).transpose(1, 2)

        q, k, v = split(self._project(query, 0)), split(self._project(key, 1)), split(self._project(value, 2))
        mask = _attention_mask(attn_mask, key_padding_mask, n, heads, length, k.shape[2], q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            if causal:
                mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril().logical_not()
                mask = torch.zeros_like(scores).masked_fill(mask, float("-inf"))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), weights


def _attention_mask(attn_mask, key_padding_mask, n, heads, length, source, dtype) -> Tensor | None:
    """``attn_mask`` ``(L, S)`` or ``(N*heads, L, S)`` and ``key_padding_mask`` ``(N, S)``,
    boolean (True = ignore) or additive, merged into one additive ``(N, heads, L, S)`` mask."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, heads, length, source) if mask.dim() == 3 else mask.view(1, 1, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask
