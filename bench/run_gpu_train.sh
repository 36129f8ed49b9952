#!/usr/bin/env bash
# rga-train end to end on a GPU, on the JAX backend, without TensorFlow (docs/BENCHMARKS.md, "rga-train end to end"):
#   bash bench/run_gpu_train.sh OUT_DIR [EPOCHS] [more bench_train.py options, e.g. --tiny on a CPU]
# Makes a synthetic set of Market-1501's size with rga-synth (once, in OUT_DIR/market_sized), trains the RGA-SC and
# the baseline recipes in mixed_bfloat16 at batch 64 (16 × 4) for EPOCHS epochs (default 5) with one evaluation
# after the last, each in its own process, then times bench_model.py's train step for both in the same call.
# Results: OUT_DIR/bench_train.json, a Markdown table on stdout, each run's log in OUT_DIR/*.log.
#
# What the machine lacks travels as wheels in .whl/ (Python 3.12, x86-64), installed here first; fetch them where
# pip works, in the repository's root (.whl/ is ignored by git through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     keras==3.15.1 namex==0.1.0 optree==0.20.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 simplejpeg==1.9.0
# (7.5 MB; the rest of what Keras and Grain need — absl-py, cloudpickle, etils, h5py, ml-dtypes, protobuf, psutil,
# rich, scipy, pillow, pyyaml, matplotlib — and JAX itself are on the H200 image, docs of the device tool.)
set -euo pipefail
out=${1:-bench_gpu_train}
epochs=${2:-5}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
python3 -c "import importlib.util, jax, keras, grain; print(jax.devices(), 'keras', keras.__version__, 'jax', \
jax.__version__, 'grain', grain.__version__, 'tensorflow installed:', importlib.util.find_spec('tensorflow') is not None)"
echo "cores: $(nproc); shared memory (Grain's workers hand batches over through it): $(df -h /dev/shm | tail -1)"
python3 bench/bench_train.py --out "$out" --epochs "$epochs" "${@:3}"
