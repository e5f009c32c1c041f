#!/usr/bin/env bash
# On a machine with a CUDA GPU: export and validate the reference models on the TensorRT and CUDA
# execution providers in fp32 and fp16, write docs/gpu_check.md (+ .json) naming the GPU, and add
# to it the torch.compile benchmark (compiled converted vs compiled original) run on the GPU.
# Installs torch 2.14.1 and cosconvert only where cosconvert is not importable already.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import cosconvert" 2>/dev/null || pip install -q torch==2.14.1 torchvision==0.29.1 -e .
python scripts/gpu_check.py --out docs/gpu_check.md
compile_args=(--device cuda --batch 32 --size 224 --repeat 3 --models ${COMPILE_MODELS:-resnet18 resnet50})
compile_log=$(mktemp)
(cd benchmarks && python compile.py "${compile_args[@]}") | tee "$compile_log"
{
  printf '\n## torch.compile, inductor (`python benchmarks/compile.py %s`)\n\n```\n' "${compile_args[*]}"
  cat "$compile_log"
  printf '```\n'
} >> docs/gpu_check.md
rm -f "$compile_log"
