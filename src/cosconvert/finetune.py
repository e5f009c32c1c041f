"""Fine-tune a converted network: with labels, by distillation from the original, or both.

Distillation (Hinton et al., 2015) is the main road, since users have the original network
but not always its labelled data: temperature-scaled KL divergence on logits, or MSE on
outputs that are not class scores. Checkpoints are written atomically at every epoch end
(and every ``checkpoint_every`` steps); ``resume=True`` continues from the last one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cosconvert.calibration import batch_inputs
from cosconvert.recipe import _atomic_save

__all__ = ["finetune", "distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2; MSE for non-class outputs."""
    if student.dim() != 2 or student.shape[1] < 2:
        return F.mse_loss(student, teacher)
    t = temperature
    return (
        F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
        * t
        * t
    )


def _labels(batch):
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, dict):
        return batch.get("label", batch.get("labels"))
    return None


@torch.no_grad()
def evaluate(model: nn.Module, data, teacher: nn.Module | None = None) -> dict:
    """Accuracy (where batches carry labels) and top-1 agreement with ``teacher``, in percent."""
    model.eval()
    correct = agree = count = labelled = 0
    for batch in data:
        inputs, y = batch_inputs(batch), _labels(batch)
        pred = model(*inputs).argmax(1)
        count += pred.shape[0]
        if y is not None:
            correct += (pred == y).sum().item()
            labelled += y.shape[0]
        if teacher is not None:
            agree += (pred == teacher.eval()(*inputs).argmax(1)).sum().item()
    out = {}
    if labelled:
        out["accuracy"] = round(100.0 * correct / labelled, 2)
    if teacher is not None:
        out["teacher_agreement"] = round(100.0 * agree / count, 2)
    return out


def finetune(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    temperature: float = 4.0,
    clip_grad: float = 1.0,
    eval_data=None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` in place with AdamW and a cosine schedule; returns the per-epoch log.

    With a ``teacher``, the loss is distillation (plus cross-entropy where batches carry
    labels); without one, cross-entropy on the labels.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size, shuffle=True, generator=generator)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    log: list[dict] = []
    start_epoch = 0
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"])
            start_epoch, log = state["epoch"], json.loads(state["log"])
    for epoch in range(start_epoch, epochs):
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            inputs, y = batch_inputs(batch), _labels(batch)
            out = model(*inputs)
            loss = torch.zeros((), device=out.device)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher.eval()(*inputs)
                loss = loss + distillation_loss(out, target, temperature)
            if y is not None and (teacher is None or out.dim() == 2):
                loss = loss + F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            opt.step()
            sched.step()
            total += loss.item() * out.shape[0]
            seen += out.shape[0]
            bar.set_postfix(loss=f"{total / seen:.4f}")
        entry = {"epoch": epoch + 1, "loss": round(total / max(seen, 1), 5)}
        if eval_data is not None:
            entry.update(evaluate(model, eval_data, teacher))
        log.append(entry)
        if progress:
            tqdm.write(json.dumps(entry))
        if ckpt is not None:
            _atomic_save({
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "generator": generator.get_state(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                "log": json.dumps(log),
            }, ckpt)  # fmt: skip
            (ckpt.parent / "log.json").write_text(json.dumps(log, indent=2))
    return log
