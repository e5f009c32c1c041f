#!/usr/bin/env bash
# On a lent CUDA GPU: #13's checks. reconstruct's AMP modes (gpu_check --checks amp, no onnxruntime-gpu
# needed), its CUDA memory at 224x224, then target 2 over as many seeds as BUDGET seconds allow, each
# seed in float32 (--amp none) and in bf16 against one original trained there, so that the table
# tells the precision's effect from the original's. Writes amp.md, memory.txt and seeds.md to OUT_DIR.
# Needs mlxtend (carry its wheel). Usage: BUDGET=400 OUT_DIR=/tmp/gr bash scripts/gpu_reconstruct.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT_DIR:-gpu-reconstruct}
mkdir -p "$out"
start=$SECONDS
python3 scripts/gpu_check.py --checks amp --out "$out/amp.md" >/dev/null
(cd benchmarks && python3 reconstruct.py --device cuda --size 224 --samples 512 --batch-size 64) >"$out/memory.txt" 2>&1
args=(--width 12 --epochs 10 --blocks stages --steps 400 --strip fold --tune-lr 1e-4 --device cuda
      --cache /tmp/cosconvert_gpu_w12_e10.pt "${@}")
for seed in $(seq 0 29); do
  for amp in none bf16; do
    if (( SECONDS - start > ${BUDGET:-400} )); then break 2; fi
    python3 examples/mnist_resnet_reconstruct.py "${args[@]}" --seed "$seed" --amp "$amp" \
      --out "$out/runs/s${seed}_$amp" >"$out/runs.log" 2>&1 || { tail -5 "$out/runs.log"; exit 1; }
    echo "seed $seed, amp $amp: done at $((SECONDS - start)) s"
  done
done
python3 scripts/reconstruct_seeds.py "$out"/runs/*/reconstruction.json | tee "$out/seeds.md"
