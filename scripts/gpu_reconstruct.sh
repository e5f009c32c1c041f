#!/usr/bin/env bash
# On a lent CUDA GPU: #13's checks. reconstruct's AMP modes (gpu_check --checks amp, no onnxruntime-gpu
# needed), its CUDA memory at 224x224, then target 2 in float32 (--amp none) over as many runs as BUDGET
# seconds allow: originals trained there with seeds 0-4, two seeds of each. On the CPU the comparison is
# level, in float32 and bf16 alike (docs/reconstruction.md); the originals are kept in OUT_DIR/originals
# (--cache) so that the CPU can run them too and tell the original's effect from CUDA's.
# Writes amp.md, memory.txt, seeds.md and originals/ to OUT_DIR. Needs mlxtend (carry its wheel).
# Usage: BUDGET=400 OUT_DIR=/tmp/gr bash scripts/gpu_reconstruct.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT_DIR:-gpu-reconstruct}
mkdir -p "$out"
start=$SECONDS
python3 scripts/gpu_check.py --checks amp --out "$out/amp.md" >/dev/null
(cd benchmarks && python3 reconstruct.py --device cuda --size 224 --samples 512 --batch-size 64) >"$out/memory.txt" 2>&1
args=(--width 12 --epochs 10 --blocks stages --steps 400 --strip fold --tune-lr 1e-4 --device cuda --amp none "${@}")
mkdir -p "$out/originals"
for seed in 0 1; do
  for original in 0 1 2 3 4; do
    if (( SECONDS - start > ${BUDGET:-400} )); then break 2; fi
    python3 examples/mnist_resnet_reconstruct.py "${args[@]}" --original-seed "$original" --seed "$seed" \
      --cache "$out/originals/w12_e10_cuda_o$original.pt" --out "$out/runs/o${original}_s$seed" \
      >"$out/runs.log" 2>&1 || { tail -5 "$out/runs.log"; exit 1; }
    echo "original $original, seed $seed: done at $((SECONDS - start)) s"
  done
done
python3 scripts/reconstruct_seeds.py "$out"/runs/*/reconstruction.json | tee "$out/seeds.md"
