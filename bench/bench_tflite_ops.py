"""Where a TFLite model's time goes under LiteRT: the nodes its XNNPACK delegate leaves to LiteRT's own
kernels, each of them timed alone, against the whole model.

    python bench/bench_tflite_ops.py OUT/tflite/rga_v1_int8_full.tflite

Which nodes the delegate leaves is `rga_keras.export.tflite.undelegated_nodes` (the export report counts them
as "outside_xnnpack"). Each is cut out of the flatbuffer into a model of its own (its constant inputs kept,
the others fed random values) and timed like the whole model: median CPU time of ``--runs`` calls with
``--threads`` LiteRT threads (default 1, where CPU time is the op's cost whatever the machine's load).
docs/BENCHMARKS.md ("Full-integer int8") has a run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_ms(model: bytes, runs: int, threads: int) -> float:
    """Median process CPU time (ms) of one invoke, on random inputs, after three untimed ones."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        dtype = detail["dtype"]
        low, high = (np.iinfo(dtype).min, np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else (0, 1)
        interpreter.set_tensor(detail["index"], rng.uniform(low, high, detail["shape"]).astype(dtype))
    for _ in range(3):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.process_time()
        interpreter.invoke()
        times.append(time.process_time() - start)
    return 1e3 * float(np.median(times))


def single_op_model(model: bytes, index: int) -> bytes:
    """The model's node ``index`` alone: its non-constant inputs become the model's inputs."""
    from tensorflow.lite.tools import flatbuffer_utils

    flat = flatbuffer_utils.read_model_from_bytearray(model)
    graph = flat.subgraphs[0]
    op = graph.operators[index]
    graph.operators = [op]
    graph.inputs = np.array([i for i in op.inputs if i >= 0 and flat.buffers[graph.tensors[i].buffer].data is None],
                            np.int32)
    graph.outputs = np.array(op.outputs, np.int32)
    flat.signatureDefs = []
    return bytes(flatbuffer_utils.convert_object_to_bytearray(flat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help=".tflite file")
    parser.add_argument("--runs", type=int, default=200, help="timed calls per model (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads (default 1)")
    args = parser.parse_args()

    from ai_edge_litert.interpreter import Interpreter

    from rga_keras.export.tflite import undelegated_nodes

    model = args.model.read_bytes()
    outside, count, partitions = undelegated_nodes(model, args.threads)
    tensors = Interpreter(model_content=model).get_tensor_details()
    shape = lambda i: "x".join(str(d) for d in tensors[i]["shape"])  # noqa: E731
    whole = cpu_ms(model, args.runs, args.threads)
    print(f"{args.model}: {count} nodes, {partitions} XNNPACK partitions, {len(outside)} nodes outside XNNPACK: "
          f"{dict(Counter(op['op_name'] for op in outside))}")
    total = 0.0
    for op in outside:
        ms = cpu_ms(single_op_model(model, op["index"]), args.runs, args.threads)
        total += ms
        print(f"  node {op['index']:4d} {op['op_name']:18s} {ms:7.3f} ms  "
              f"({', '.join(shape(i) for i in op['inputs'] if i >= 0)}) -> {shape(op['outputs'][0])}")
    print(f"outside XNNPACK, each alone: {total:.2f} ms of the whole model's {whole:.2f} ms "
          f"({100 * total / whole:.0f} %), median CPU time, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
