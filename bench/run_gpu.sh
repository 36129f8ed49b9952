#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one command, on the JAX backend (no TensorFlow needed):
#   bash bench/run_gpu.sh OUT_DIR
# Train step and inference, batch 64, 256×128, float32 and mixed_bfloat16, baseline vs RGA-SC (fused),
# then the float32 baseline train step with true float32 matrix products (JAX's default on GPUs rounds
# float32 products to TF32), which tells what float32 costs without that shortcut.
set -euo pipefail
out=${1:-bench_gpu}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 -c "import jax, keras; print(jax.devices(), 'keras', keras.__version__, 'jax', jax.__version__)"
for precision in float32 mixed_bfloat16; do
  python3 bench/bench_model.py --train --batch-sizes 64 --configs baseline rga_sc_fused --repeats 10 --rounds 1 \
    --precision "$precision" --json "$out/train_$precision.json"
  python3 bench/bench_model.py --batch-sizes 64 --configs baseline rga_sc_fused --repeats 20 --rounds 1 \
    --precision "$precision" --json "$out/infer_$precision.json"
done
JAX_DEFAULT_MATMUL_PRECISION=highest python3 bench/bench_model.py --train --batch-sizes 64 --configs baseline \
  --repeats 10 --rounds 1 --json "$out/train_float32_highest.json"
