"""Forward latency, train-step throughput and peak memory: baseline, RGA-SC (fused, explicit), Table 2's schemes.

Runs on the Keras backend in KERAS_BACKEND: TensorFlow (a `tf.function` step, ``--xla`` to jit-compile it)
or JAX (a `jax.jit` step over `model.stateless_call`, always XLA; no TensorFlow is imported). Each
configuration runs in its own subprocess, so peak memory (CPU: max RSS; GPU: the framework's peak
allocation) belongs to that configuration alone, and the ratios come from one invocation of this script.

    python bench/bench_model.py                          # CPU forward, batch 1 and 16
    KERAS_BACKEND=jax python bench/bench_model.py --train --batch-sizes 64 --precision mixed_bfloat16  # a GPU
    python bench/bench_model.py --markdown docs/bench_model_cpu.md
    python bench/bench_model.py --batch-sizes 1 --configs baseline se nl rga_sc_fused   # Table 2's schemes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from rga_keras.attention import ATTENTIONS

CONFIGS = {"baseline": (None, "fused"), "rga_sc_fused": ("sc", "fused"), "rga_sc_explicit": ("sc", "explicit")}
DEFAULT_CONFIGS = list(CONFIGS)
CONFIGS.update({name: (name, "fused") for name, spec in ATTENTIONS.items() if spec.table == 2})  # the comparison schemes of Table 2, by name
NUM_CLASSES = 751


def _tf_step(model, train: bool, precision: str, xla: bool):
    """A TensorFlow step function (x, y) → a scalar or the features, and a function syncing its result."""
    import keras
    import tensorflow as tf

    if train:
        optimizer = keras.optimizers.Adam(1e-4)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        @tf.function(jit_compile=xla)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True)["logits"])
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply(grads, model.trainable_weights)
            return loss
    else:
        @tf.function(jit_compile=xla)
        def step(x, y):
            return model(x, training=False)["features"]
    return step, lambda out: out.numpy()


def _jax_step(model, train: bool, precision: str, images, labels):
    """A JAX step compiled ahead of time over the model's state (donated and replaced each step, as Keras'
    own JAX trainer does): forward, softmax cross-entropy, gradients, Adam. Also returns XLA's cost
    analysis of the compiled step (the bytes it accesses)."""
    import jax
    import keras

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if not train:
        def infer(tv, ntv, x, y):
            return model.stateless_call(tv, ntv, x, training=False)[0]["features"]

        compiled = jax.jit(infer).lower(trainable, non_trainable, images, labels).compile()
        return (lambda x, y: compiled(trainable, non_trainable, x, y), lambda out: out.block_until_ready(),
                _cost(compiled))

    optimizer = keras.optimizers.Adam(1e-4)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    state = [trainable, non_trainable, [v.value for v in optimizer.variables]]

    def loss_and_updates(tv, ntv, x, y):
        outputs, ntv = model.stateless_call(tv, ntv, x, training=True)
        return loss_fn(y, outputs["logits"]), ntv

    grad_fn = jax.value_and_grad(loss_and_updates, has_aux=True)

    def train_step(state, x, y):
        tv, ntv, ov = state
        (loss, ntv), grads = grad_fn(tv, ntv, x, y)
        tv, ov = optimizer.stateless_apply(ov, grads, tv)
        return loss, [tv, ntv, ov]

    compiled = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()

    def step(x, y):
        loss, state[:] = compiled(state, x, y)
        return loss

    return step, lambda out: out.block_until_ready(), _cost(compiled)


def _cost(compiled) -> dict:
    """XLA's own count of the bytes a compiled step reads and writes (its FLOP count leaves out library
    calls such as cuDNN convolutions, so only the bytes are reported)."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"xla_bytes": float(analysis.get("bytes accessed", 0.0))}


def _peak_memory() -> tuple[int, str]:
    """Peak memory of this process's accelerator (else its max RSS) and the device kind."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "gpu":
            return int(device.memory_stats()["peak_bytes_in_use"]), "GPU"
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]), "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "CPU"


def _measure(config: str, batch: int, train: bool, precision: str, xla: bool, repeats: int, size) -> dict:
    """Runs inside the subprocess: build, warm up, time `repeats` calls, report median and peak memory."""
    import keras
    import numpy as np

    import rga_keras

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    attention, relation = CONFIGS[config]
    model = rga_keras.build_rga_resnet50(NUM_CLASSES, attention, input_shape=(*size, 3), relation=relation)
    images = keras.ops.convert_to_tensor(np.random.default_rng(0).uniform(0, 255, (batch, *size, 3)), "float32")
    labels = keras.ops.convert_to_tensor(np.arange(batch) % NUM_CLASSES, "int32")
    compile_start, cost = time.perf_counter(), {}
    if keras.backend.backend() == "jax":
        step, sync, cost = _jax_step(model, train, precision, images, labels)
    else:
        step, sync = _tf_step(model, train, precision, xla)
    sync(step(images, labels))
    compile_s = time.perf_counter() - compile_start
    for _ in range(2):
        sync(step(images, labels))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(step(images, labels))
        times.append(time.perf_counter() - start)
    peak, device = _peak_memory()
    median = statistics.median(times)
    return {"config": config, "batch": batch, "median_s": median, "images_per_s": batch / median,
            "peak_bytes": peak, "device": device, "first_call_s": compile_s, **cost}


def _giga(result: dict, key: str) -> str:
    return f"{result[key] / 1e9:.0f}" if key in result else "–"


def _machine() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "gpu":
            return f"{device.device_kind}, Keras {keras.__version__} on JAX {jax.__version__}"
        return f"{platform.machine()}, {os.cpu_count()} cores, Keras {keras.__version__} on JAX {jax.__version__}"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{details.get('device_name', 'GPU')} ×{len(gpus)}, TF {tf.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--train", action="store_true", help="time a training step instead of inference")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--xla", action="store_true", help="jit_compile the step (TensorFlow; JAX always is)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of every configuration")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--markdown", help="write a Markdown table here")
    parser.add_argument("--_single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._single:
        config, batch = args._single.split(":")
        print(json.dumps(_measure(config, int(batch), args.train, args.precision, args.xla, args.repeats,
                                  tuple(args.size))))
        return 0

    # Rounds interleave the configurations, so a slow spell of the machine hits all of them alike;
    # each figure is the median over rounds.
    runs: dict = {}
    for round_ in range(args.rounds):
        for batch in args.batch_sizes:
            for config in args.configs:
                cmd = [sys.executable, __file__, "--_single", f"{config}:{batch}", "--precision", args.precision,
                       "--repeats", str(args.repeats), "--size", *map(str, args.size)]
                cmd += ["--train"] * args.train + ["--xla"] * args.xla
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{config} at batch {batch} failed (exit {out.returncode})")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((config, batch), []).append(r)
                print(f"round {round_ + 1}: {config:16s} batch {batch:3d}: {r['median_s'] * 1e3:9.1f} ms  "
                      f"{r['images_per_s']:8.1f} img/s  peak {r['peak_bytes'] / 2**30:6.2f} GiB", flush=True)
    results = []
    for (config, batch), rs in runs.items():
        median = statistics.median(r["median_s"] for r in rs)
        results.append({**rs[0], "median_s": median, "images_per_s": batch / median,
                        "peak_bytes": max(r["peak_bytes"] for r in rs), "rounds": [r["median_s"] for r in rs]})

    import keras

    xla = args.xla or keras.backend.backend() == "jax"
    what = ("train step" if args.train else "forward") + f", {args.precision}" + (", XLA" if xla else "")
    lines = [f"Machine: {_machine()}. {what}, input {args.size[0]}×{args.size[1]}, median over {args.rounds} "
             f"interleaved rounds of the median of {args.repeats} calls.", "",
             "| model | batch | latency (ms) | images/s | × baseline | peak memory (GiB) | XLA GB accessed |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        base = next((b for b in results if b["config"] == "baseline" and b["batch"] == r["batch"]), None)
        ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "–"
        lines.append(f"| {r['config']} | {r['batch']} | {r['median_s'] * 1e3:.1f} | {r['images_per_s']:.1f} | "
                     f"{ratio} | {r['peak_bytes'] / 2**30:.2f} | {_giga(r, 'xla_bytes')} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": what, "machine": _machine(), "results": results}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
