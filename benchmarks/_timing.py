"""Side-by-side timing: every candidate runs in the same loop, interleaved, so ratios share conditions.

Each candidate's fastest run is kept: on a shared machine noise only ever adds time, and medians here
moved by 1.3x between runs of the same script, the fastest runs far less."""

import time
from collections.abc import Callable


def compare(candidates: dict[str, Callable[[], object]], repeat: int = 7, warmup: int = 2) -> dict[str, float]:
    """Fastest seconds per call of each candidate, measured round-robin."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: min(times) for name, times in samples.items()}
