#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one command, on the JAX backend (no TensorFlow needed):
#   bash bench/run_gpu.sh OUT_DIR
# Batch 64, 256×128, each configuration in its own process, back to back: the train step in mixed_bfloat16
# (baseline, RGA-SC fused, and two of Table 2's schemes: SE and the non-local block), the float32 train
# step, then inference in both precisions (baseline vs RGA-SC). JSON per table in OUT_DIR.
set -euo pipefail
out=${1:-bench_gpu}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 -c "import jax, keras; print(jax.devices(), 'keras', keras.__version__, 'jax', jax.__version__)"
python3 bench/bench_model.py --train --batch-sizes 64 --configs baseline rga_sc_fused se nl --repeats 10 --rounds 1 \
  --precision mixed_bfloat16 --json "$out/train_mixed_bfloat16.json"
python3 bench/bench_model.py --train --batch-sizes 64 --configs baseline rga_sc_fused --repeats 10 --rounds 1 \
  --precision float32 --json "$out/train_float32.json"
for precision in mixed_bfloat16 float32; do
  python3 bench/bench_model.py --batch-sizes 64 --configs baseline rga_sc_fused --repeats 20 --rounds 1 \
    --precision "$precision" --json "$out/infer_$precision.json"
done
