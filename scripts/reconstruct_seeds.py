"""Table of #13's comparison over many runs of examples/mnist_resnet_reconstruct.py.

    python scripts/reconstruct_seeds.py RUN_DIR/reconstruction.json ... > seeds.md

One row per run (its device and amp, its original's seed and accuracy, its seed), then per device and
amp: the means, and reconstruct + 1 epoch minus 5 epochs of distillation (accuracy and agreement with
the original) with its standard error, its median (a distillation that collapses in one run moves the
mean) and the count of wins, ties and losses. Runs that share both seeds differ only in the setting
that the table names, so the groups can be set side by side.
"""

import json
import statistics
import sys
from collections import defaultdict

COLUMNS = ("reconstruct (", "distillation alone", "reconstruct + 1 epoch", "5 epochs")


def cell(row: dict) -> str:
    return f"{row['accuracy']} ({row['agreement']})"


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        result = json.load(open(path))
        rows = result["strip"]["fold"]["rows"]
        picked = [next(v for k, v in rows.items() if k.startswith(c)) for c in COLUMNS]
        settings = result["settings"]
        amp = f"{settings.get('device', 'cpu')}, {settings.get('amp', 'auto') or 'none'}"
        original_seed = settings.get("original_seed", 0)
        runs.append((amp, original_seed, settings["seed"], result["original"]["accuracy"], picked))
    runs.sort(key=lambda r: r[:3])
    print("| device, amp | original: seed, accuracy % | seed | reconstruct (agreement) | distillation, same wall-clock | "
          "reconstruct + 1 epoch | 5 epochs distillation |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    groups = defaultdict(list)
    for amp, original_seed, seed, original, picked in runs:
        print(f"| {amp} | {original_seed}, {original} | {seed} | " + " | ".join(cell(r) for r in picked) + " |")
        groups[amp].append(picked)
    print(
        "\n| device, amp | runs | means: reconstruct, + 1 epoch, 5 epochs | + 1 epoch minus 5 epochs: accuracy | agreement | wins, ties, losses |"
    )
    print("|---|---|---|---|---|---|")
    for amp, picked in groups.items():
        means = [statistics.mean(p[i]["accuracy"] for p in picked) for i in (0, 2, 3)]
        diffs = {k: [p[2][k] - p[3][k] for p in picked] for k in ("accuracy", "agreement")}

        def summary(d: list[float]) -> str:
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            return f"{statistics.mean(d):+.2f} (SE {se:.2f}; median {statistics.median(d):+.1f})"

        record = [sum(d > 1e-9 for d in diffs["accuracy"]), sum(abs(d) <= 1e-9 for d in diffs["accuracy"]),
                  sum(d < -1e-9 for d in diffs["accuracy"])]  # fmt: skip
        print(f"| {amp} | {len(picked)} | " + ", ".join(f"{m:.2f}" for m in means) + f" | {summary(diffs['accuracy'])} | "
              f"{summary(diffs['agreement'])} | {', '.join(map(str, record))} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
