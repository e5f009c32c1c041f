#!/usr/bin/env bash
# On a machine with a CUDA GPU: export and validate the reference models on the TensorRT and CUDA
# execution providers in fp32 and fp16, write docs/gpu_check.md (+ .json) naming the GPU, and add
# to it the torch.compile benchmark (compiled converted vs compiled original) run on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.14.1 torchvision==0.29.1 -e .
python scripts/gpu_check.py --out docs/gpu_check.md
compile_log=$(mktemp)
python benchmarks/compile.py --device cuda --batch 32 --size 224 --repeat 5 | tee "$compile_log"
{
  printf '\n## torch.compile, inductor (`python benchmarks/compile.py --device cuda --batch 32 --size 224 --repeat 5`)\n\n```\n'
  cat "$compile_log"
  printf '```\n'
} >> docs/gpu_check.md
rm -f "$compile_log"
