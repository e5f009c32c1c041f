#!/usr/bin/env bash
# On a machine with a CUDA GPU: export and validate the reference models on the TensorRT and CUDA
# execution providers in fp32 and fp16, and write docs/gpu_check.md (+ .json) naming the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.14.1 torchvision==0.29.1 -e .
python scripts/gpu_check.py --out docs/gpu_check.md
