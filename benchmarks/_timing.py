"""Side-by-side timing: every candidate runs in the same loop, interleaved, so ratios share conditions.

Each candidate's fastest run is kept: on a shared machine noise only ever adds time, and medians here
moved by 1.3x between runs of the same script, the fastest runs far less.

Where each candidate has its own thread pool (an onnxruntime session each), a pool's threads keep
spinning for a while after its call returns and slow the next candidate down: give ``block`` > 1, so
each candidate runs that many calls in a row and the first of them, which meets the spin, is not kept."""

import ctypes
import time
from collections.abc import Callable


def _steady_allocator() -> None:
    """Keep freed memory in the process (glibc): by default each large tensor is its own mmap, freed
    back to the system after every call, so every call page-faults its buffers in again. That cost
    varied from second to second here: a compiled resnet18's fastest of 30 calls moved between 14.5
    and 21 ms from one process to the next, and by 10% between two runs in one; with this, 14.9-15.5 ms."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to set
        return
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's top back
    libc.mallopt(-3, 2**25)  # M_MMAP_THRESHOLD: glibc's largest, 32 MB; smaller blocks come from the heap


_steady_allocator()


def compare(
    candidates: dict[str, Callable[[], object]], repeat: int = 7, warmup: int = 2, block: int = 1
) -> dict[str, float]:
    """Fastest seconds per call of each candidate, measured round-robin: ``repeat`` rounds of
    ``block`` calls of each candidate (``repeat * (block - 1)`` timed calls each where ``block`` > 1)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            for call in range(block):
                start = time.perf_counter()
                fn()
                if block == 1 or call > 0:
                    samples[name].append(time.perf_counter() - start)
    return {name: min(times) for name, times in samples.items()}
