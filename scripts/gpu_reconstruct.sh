#!/usr/bin/env bash
# On a lent CUDA GPU: #13's checks. reconstruct's AMP modes (gpu_check --checks amp, no onnxruntime-gpu
# needed) and its CUDA memory at 224x224, then target 2 in float32 (--amp none): originals trained there
# with seeds 0-4, two seeds of each. The originals are kept in OUT_DIR/originals (--cache) so that the
# CPU can run them too (docs/reconstruction.md, "On a GPU again": both devices then give the same
# reconstruct results; only five epochs of distillation land differently).
# The width-12 network leaves the GPU idle between its small kernels, so each original runs in its own
# process, all five at once; a seed-1 run starts only while under BUDGET seconds have passed.
# Writes amp.md, memory.txt, seeds.md, originals/ and runs/ to OUT_DIR. Needs mlxtend (carry its wheel).
# Usage: BUDGET=400 OUT_DIR=/tmp/gr bash scripts/gpu_reconstruct.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT_DIR:-gpu-reconstruct}
mkdir -p "$out/originals" "$out/runs"
start=$SECONDS
python3 scripts/gpu_check.py --checks amp --out "$out/amp.md" >"$out/amp.log" 2>&1 &
(cd benchmarks && python3 reconstruct.py --device cuda --size 224 --samples 512 --batch-size 64) >"$out/memory.txt" 2>&1 &
args=(--width 12 --epochs 10 --blocks stages --steps 400 --strip fold --tune-lr 1e-4 --device cuda --amp none
  --threads 2 "${@}")
for original in 0 1 2 3 4; do
  for seed in 0 1; do
    if (( SECONDS - start > ${BUDGET:-400} )); then break; fi
    run=o${original}_s$seed
    python3 examples/mnist_resnet_reconstruct.py "${args[@]}" --original-seed "$original" --seed "$seed" \
      --cache "$out/originals/w12_e10_cuda_o$original.pt" --out "$out/runs/$run" >"$out/runs/$run.log" 2>&1 \
      && echo "$run: done at $((SECONDS - start)) s" || { echo "$run failed:"; tail -5 "$out/runs/$run.log"; }
  done &
done
wait
python3 scripts/reconstruct_seeds.py "$out"/runs/*/reconstruction.json | tee "$out/seeds.md"
