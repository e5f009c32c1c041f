"""Fine-tune a converted network: with labels, by distillation from the original, or both.

Distillation (Hinton et al., 2015) is the main road, since users have the original network
but not always its labelled data: temperature-scaled KL divergence on logits, or MSE on
outputs that are not class scores.

Checkpoints are written atomically every ``checkpoint_every`` steps and at each epoch end.
``resume=True`` continues from the last one, mid-epoch included: the epoch's shuffling is
replayed from the saved generator state and the batches already seen are skipped, so with
a fixed seed a resumed run ends with the same weights as an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE > 1``) training is data-parallel: DistributedDataParallel,
a DistributedSampler, gloo on CPU and NCCL on GPU; only rank 0 logs and writes files. A model the
caller sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) is trained as it is: FSDP
reduces the gradients, and checkpoints hold the full state, gathered to rank 0 (every rank reads
it back on resume and keeps its shard).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm.auto import tqdm

from cosconvert.agreement import Agreement, first_output, score
from cosconvert.amp import mixed_precision
from cosconvert.atomic import atomic_write, remove_partial
from cosconvert.data import batch_inputs
from cosconvert.distributed import rank_and_world

__all__ = ["finetune", "distillation_loss", "evaluate"]


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened scores over the last axis, scaled by T^2: for
    ``(N, classes)`` scores, and with ``mask`` ``(N, T)`` for a language model's ``(N, T, vocab)`` logits,
    per token and averaged over the tokens where ``mask`` is 1 (a padded position carries no loss).
    MSE for outputs that are not class scores."""
    t = temperature
    if mask is not None:
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                      reduction="none").sum(-1)  # fmt: skip
        weight = mask.to(kl.dtype)
        return (kl * weight).sum() / weight.sum().clamp_min(1) * t * t
    if student.dim() != 2 or student.shape[1] < 2:
        return F.mse_loss(student, teacher)
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean")
    return kl * t * t


def _split(batch) -> tuple[tuple, dict, torch.Tensor | None, torch.Tensor | None]:
    """A batch as (positional inputs, keyword inputs, labels, token mask). A language model's batch,
    ``{"input_ids": ..., "attention_mask": ...}``, goes in as keywords, and its mask says which tokens
    its per-token distillation counts (all of them without one); it has no labels."""
    if isinstance(batch, dict) and "input_ids" in batch:
        named = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return (), named, None, named.get("attention_mask", torch.ones_like(named["input_ids"]))
    return batch_inputs(batch), {}, _labels(batch), None


def _labels(batch):
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    if isinstance(batch, dict):
        return batch.get("label", batch.get("labels"))
    return None


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, data, teacher: nn.Module | None = None) -> dict:
    """Accuracy (%, where batches carry labels), and with a ``teacher`` the headline agreement with it
    (:func:`cosconvert.agreement.score`: top-1 agreement % for a classifier, per-unit agreement % for
    sigmoid outputs, output cosine for embeddings)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = labelled = 0
    running = Agreement()
    for batch in data:
        inputs, named, y, _ = _split(_to(batch, device))
        out = model(*inputs, **named)
        if y is not None:
            correct += (first_output(out).argmax(1) == y).sum().item()
            labelled += y.shape[0]
        if teacher is not None:
            running.add(teacher.eval()(*inputs, **named), out)
    model.train(was_training)
    result = {}
    if labelled:
        result["accuracy"] = round(100.0 * correct / labelled, 2)
    if teacher is not None:
        result["teacher_agreement"] = score(running.result())[0]
    return result


def _plot(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in log]
    fig, (loss, held) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss.plot(epochs, [e["loss"] for e in log], marker="o")
    loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, words in (("accuracy", "accuracy (labels)"), ("teacher_agreement", "top-1 agreement with the teacher")):
        if any(key in e for e in log):
            held.plot(epochs, [e.get(key, float("nan")) for e in log], marker="o", label=words)
    held.set(xlabel="epoch", ylabel="%", title="held-out data")
    if held.lines:
        held.legend()
    else:
        held.text(0.5, 0.5, "no held-out data (eval_data)", ha="center", va="center", transform=held.transAxes)
    for ax in (loss, held):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(epochs) + 0.5)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _write_logs(log: list[dict], folder: Path) -> None:
    with atomic_write(folder / "log.json") as tmp:
        tmp.write_text(json.dumps(log, indent=2))
    keys = sorted({k for e in log for k in e}, key=lambda k: (k != "epoch", k))
    with atomic_write(folder / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(log)
    _plot(log, folder / "curves.png")


WRITES = ("last.pt", "log.json", "log.csv", "curves.png")  # what a run writes into its checkpoint folder


def finetune(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    temperature: float = 4.0,
    clip_grad: float = 1.0,
    loss_fn=None,
    eval_data=None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    amp: str | None = "auto",
    verbose: bool = False,
    progress: bool | None = None,
) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch log (loss, throughput, held-out metrics).

    With a ``teacher``, the loss is distillation (plus ``loss_fn``, cross-entropy by default,
    where batches carry labels); without one, ``loss_fn`` on the labels. A language model's batches
    are dicts of ``input_ids`` and ``attention_mask``, passed as keywords; its logits are distilled
    per token, padded positions left out (:func:`distillation_loss`). ``optimizer``:
    ``"adamw"`` or ``"sgd"`` (momentum 0.9), both with a cosine schedule (a constant rate on an
    ``IterableDataset`` with no length). ``amp``: ``"auto"`` (bf16 on CUDA, float32 elsewhere),
    ``"bf16"``, ``"fp16"`` (with a gradient scaler) or ``None``, on any device. A Dataset is batched with
    ``batch_size``; a DataLoader's own dataset and batch size are used, reshuffled with this
    run's seed so resuming is exact.

    ``checkpoint_dir`` gets ``last.pt``, ``log.json``, ``log.csv`` and ``curves.png`` (loss, and
    held-out accuracy and teacher agreement with ``eval_data``). With ``resume``, the log's entry
    for the epoch it resumed in says ``resumed_at_step``. Prints progress only with ``verbose=True``
    (``progress`` is its old name).
    """
    verbose = verbose if progress is None else progress
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    amp, autocast, scaler = mixed_precision(amp, device)
    given = data if isinstance(data, DataLoader) else None
    dataset = given.dataset if given is not None else data
    batch_size = given.batch_size if given is not None and given.batch_size else batch_size
    collate = given.collate_fn if given is not None else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):  # a stream: used as given (no reshuffling, resume restarts the epoch)
        sampler, loader = None, given if given is not None else DataLoader(dataset, batch_size)
    else:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed) if world > 1 else None
        loader = DataLoader(dataset, batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                            collate_fn=collate)  # fmt: skip
    sharded = isinstance(model, FSDPModule)  # FSDP2: the caller sharded it with fully_shard
    net = nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else model
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = len(loader) if not isinstance(dataset, IterableDataset) or hasattr(dataset, "__len__") else None
    if steps is None:  # a stream of unknown length: no schedule to spread over it, the learning rate stays
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps))
    loss_fn = loss_fn or F.cross_entropy
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    ckpt = folder / "last.pt" if folder else None
    log: list[dict] = []
    start_epoch, skip, epoch_rng, resumed = 0, 0, generator.get_state(), False
    if ckpt is not None and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_partial(folder, WRITES)  # a killed run's unfinished writes
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if sharded:  # every rank reads the full state and keeps its own shard of it
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))  # fmt: skip
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # an fp16 run's; a disabled scaler saves {}
            scaler.load_state_dict(state["scaler"])
        start_epoch, skip, epoch_rng = state["epoch"], state["step"], state["epoch_generator"]
        torch.set_rng_state(state["torch_rng"])  # dropout and the like continue where they were
        log = json.loads(state["log"])
        resumed = True

    def save(epoch: int, step: int, rng_state: torch.Tensor) -> None:
        if ckpt is None:
            return
        if sharded:  # gathering the full state takes every rank; rank 0 gets it, on the CPU
            weights, moments = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            weights, moments = model.state_dict(), opt.state_dict()
        if rank != 0:
            return
        with atomic_write(ckpt) as tmp:
            torch.save({
                "model": weights, "optimizer": moments, "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "epoch_generator": rng_state, "torch_rng": torch.get_rng_state(),
                "log": json.dumps(log),
            }, tmp)  # fmt: skip

    for epoch in range(start_epoch, epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.set_state(epoch_rng)  # this epoch's shuffle, replayable on resume
        net.train()
        total, seen, started = 0.0, 0, time.perf_counter()
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{epochs}", disable=not verbose or rank,
                   leave=False)  # fmt: skip
        for step, batch in enumerate(loader):
            if step < skip:
                continue
            batch = _to(batch, device)
            inputs, named, y, mask = _split(batch)  # mask: a language model's, distilled per token
            with autocast:
                out = first_output(net(*inputs, **named))  # a transformers output: its logits
                loss = torch.zeros((), device=device)
                if teacher is not None:
                    with torch.no_grad():
                        target = first_output(teacher.eval()(*inputs, **named))
                    loss = loss + distillation_loss(out.float(), target.float(), temperature, mask)
                if y is not None:
                    loss = loss + loss_fn(out.float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients
            nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * out.shape[0]
            seen += out.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{total / seen:.4f}", samples_s=f"{seen / (time.perf_counter() - started):.0f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and (steps is None or step + 1 < steps):
                save(epoch, step + 1, epoch_rng)
        bar.close()
        entry = {"epoch": epoch + 1, "loss": round(total / max(seen, 1), 5), "amp": amp,
                 "samples_per_s": round(seen * world / (time.perf_counter() - started), 1)}  # fmt: skip
        if resumed:
            entry["resumed_at_step"], resumed = skip, False
        skip, epoch_rng = 0, generator.get_state()
        if eval_data is not None and (rank == 0 or sharded):  # a sharded forward takes every rank
            entry.update(evaluate(model, eval_data, teacher))
        log.append(entry)
        save(epoch + 1, 0, epoch_rng)  # first: a log that shows an epoch means its checkpoint is there
        if rank == 0:
            if verbose:
                tqdm.write(json.dumps(entry), file=sys.stderr)
            if folder is not None:
                _write_logs(log, folder)
    if world > 1:
        dist.barrier()
    return log
