"""Mixed precision for the training loops (``reconstruct``, ``finetune``): one setting, ``amp``.

``"auto"`` is bf16 on CUDA and float32 elsewhere; ``"bf16"`` and ``"fp16"`` autocast on any device;
``None`` is float32. fp16 steps go through a gradient scaler, since its small gradients would
underflow; bf16 has float32's range and needs none. The cosine layers take their norms in float32
under any of them.
"""

from __future__ import annotations

import torch

MODES = ("auto", "bf16", "fp16", None)


def mixed_precision(amp: str | None, device: torch.device) -> tuple[str | None, torch.autocast, torch.amp.GradScaler]:
    """The mode that runs on ``device`` ("auto" resolved), its autocast context and its gradient
    scaler (a pass-through unless fp16)."""
    if amp not in MODES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or None, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype, enabled=amp is not None)
    return amp, autocast, torch.amp.GradScaler(device.type, enabled=amp == "fp16")
