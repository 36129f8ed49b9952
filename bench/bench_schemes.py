"""Forward latency of the paper's comparison schemes (Table 2) against the baseline and RGA-SC, on CPU.

Every model lives in this one process and they are called in turn, one call each per round with the order
rotated every round, so a busy spell of a shared machine hits them alike. Each call is timed twice: wall
clock, and the CPU time the process spent on it. With ``--threads 1`` (the default) the CPU time is the
single-thread latency the call would have on an idle core, which other programs competing for the cores
barely change; the wall clock shows the contention. The table gives medians over the rounds and the CPU
times' ratios to the baseline's.

    python bench/bench_schemes.py --batch 1 --rounds 30 --markdown out.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="calls of every model, interleaved")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow's intra- and inter-op threads")
    parser.add_argument("--markdown", help="write the Markdown table here")
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    import rga_keras
    from rga_keras.attention import ATTENTIONS

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    attention = {"baseline": None, **{name: name for name, spec in ATTENTIONS.items() if spec.table == 2}, "rga_sc (fused)": "sc"}
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (args.batch, *args.size, 3)).astype("float32"))
    steps = {}
    for name, mode in attention.items():
        model = rga_keras.build_rga_resnet50(751, mode, input_shape=(*args.size, 3))
        steps[name] = tf.function(lambda x, model=model: model(x, training=False)["features"])
        for _ in range(2):  # trace, then one warm call
            steps[name](images).numpy()
    load_before = os.getloadavg()[0]
    names = list(steps)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name](images).numpy()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]

    wall_ms, cpu_ms = ({name: 1e3 * statistics.median(t[name]) for name in names} for t in (wall, cpu))
    lines = [f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}, "
             f"{args.threads} thread(s), float32 forward, batch {args.batch}, input {args.size[0]}×{args.size[1]}, "
             f"medians of {args.rounds} interleaved rounds; load average {load_before:.1f} before the timed "
             f"rounds, {load_after:.1f} after.", "",
             "| model | CPU time (ms) | × baseline | wall clock (ms) |", "|---|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {cpu_ms[name]:.1f} | {cpu_ms[name] / cpu_ms['baseline']:.2f} | "
                     f"{wall_ms[name]:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
