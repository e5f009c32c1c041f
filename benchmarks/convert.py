"""What converting costs.

    python benchmarks/convert.py [--repeat 3]   # time: resnet50 and vit_b_16, next to fx.symbolic_trace alone
    python benchmarks/convert.py --inplace      # memory: a ~1.1B-parameter Llama, copied and in place

``--inplace`` builds a transformers ``LlamaForCausalLM`` from a config (TinyLlama's shape, random
weights) in a fresh process per mode and samples that process's resident memory every 5 ms while
``convert`` runs: its peak, next to the model's own bytes, and the time.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

import cosconvert

LLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False}  # fmt: skip


def timing(repeat: int) -> None:
    import torch.fx as fx
    import torchvision
    from _timing import compare  # sets the allocator for steady timings: not for the memory runs

    print(f"{'model':10} {'symbolic_trace s':>17} {'convert s':>10} {'fold s':>8} {'convert/trace':>14}")
    for name in ["resnet50", "vit_b_16"]:
        model = torchvision.models.get_model(name).eval()
        t = compare(
            {
                "trace": lambda: fx.symbolic_trace(model),
                "convert": lambda: cosconvert.convert(model),
                "fold": lambda: cosconvert.convert(model, strip_norms="fold"),
            },
            repeat=repeat,
            warmup=1,
        )
        print(f"{name:10} {t['trace']:17.3f} {t['convert']:10.3f} {t['fold']:8.3f} {t['convert'] / t['trace']:14.1f}")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(inplace: bool) -> None:
    """One mode, in this (fresh) process: print a JSON line of what it measured."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    converted = cosconvert.convert(model, inplace=inplace)
    seconds = time.perf_counter() - start
    running[0] = False
    sampler.join()
    report = converted.cosine_report
    print(json.dumps({
        "mode": "inplace" if inplace else "copy", "params": report.parameters["original"], "model_bytes": model_bytes,
        "rss_before": before, "peak": max(peak[0], _rss()), "seconds": seconds, "converted": len(report.converted),
    }))  # fmt: skip


def memory() -> None:
    gib = 2**30
    print(f"{'mode':8} {'params':>7} {'model GiB':>9} {'RSS before':>10} {'peak GiB':>9} {'peak/model':>10} "
          f"{'added/model':>11} {'time s':>7} {'layers':>6}")  # fmt: skip
    for mode in ("copy", "inplace"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True,
                              check=True)  # fmt: skip
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        m = r["model_bytes"]
        print(f"{mode:8} {r['params'] / 1e9:6.2f}B {m / gib:9.2f} {r['rss_before'] / gib:10.2f} {r['peak'] / gib:9.2f} "
              f"{r['peak'] / m:10.2f} {(r['peak'] - r['rss_before']) / m:11.2f} {r['seconds']:7.1f} {r['converted']:6}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inplace", action="store_true", help="peak memory of a ~1.1B Llama, copied and in place")
    parser.add_argument("--memory-child", choices=["copy", "inplace"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child == "inplace")
    elif args.inplace:
        memory()
    else:
        timing(args.repeat)


if __name__ == "__main__":
    main()
