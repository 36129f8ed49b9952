"""Time and memory of rga_keras.retrieval: exact top-k search against one float32 matrix product of the same
size, and embedding throughput per model format.

    python bench/bench_retrieval.py                         # search cases market and msmt
    python bench/bench_retrieval.py --cases market --embed  # also images/s per model format at 256x128

Search: 3,368 random L2-normalised 2,048-d queries against 15,913 (Market-1501) and 82,161 (MSMT17) gallery
vectors, top 10; each case in a fresh subprocess so that ru_maxrss is its own. Reported:
  search s   wall-clock seconds of retrieval.search (features already in memory)
  matmul s   one float32 product query @ gallery.T of the same size (the full matrix, no ranking)
  traced     tracemalloc peak during search: the NumPy allocations it makes (BLAS scratch not traced)
  max RSS    the child's peak resident memory, and the RSS before the call (Python, TF, the inputs)
Embedding: an untrained RGA-SC ResNet-50 at 256x128 (BatchNorm statistics estimated on the images) saved as
.keras, SavedModel and float32/float16/dynamic TFLite; images/s of the Embedder on batches of 32 raw-pixel
images already in memory (decoding excluded), median of 3 runs after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CASES = {"market": (3368, 15913, 2048), "msmt": (3368, 82161, 2048)}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def search_case(name: str) -> dict:
    import numpy as np

    from rga_keras.retrieval import search

    nq, ng, dim = CASES[name]
    rng = np.random.default_rng(0)
    query, gallery = (rng.standard_normal((n, dim), dtype=np.float32) for n in (nq, ng))
    for x in (query, gallery):  # normalised in place: ru_maxrss is a lifetime peak, so no copies before the call
        x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    rss_before = _rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    search(query, gallery, 10)
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    product = query @ gallery.T
    matmul = time.perf_counter() - start
    return {"case": name, "queries": nq, "gallery": ng, "dim": dim, "search_s": seconds, "matmul_s": matmul,
            "traced_mib": traced / 2**20, "rss_before_mib": rss_before, "max_rss_mib": max_rss,
            "full_matrix_mib": product.nbytes / 2**20}


def embed_rates(batch: int = 32, runs: int = 3) -> list[tuple[str, float]]:
    import numpy as np

    import rga_keras
    from rga_keras import export, retrieval

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, 256, 128, 3)).astype(np.float32)
    model = rga_keras.build_rga_resnet50(751, attention="sc", input_shape=(256, 128, 3))
    export.estimate_batchnorm_statistics(model, images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"keras": tmp / "model.keras", "saved_model": tmp / "serving" / "1"}
        model.save(paths["keras"])
        export.write_saved_model(model, paths["saved_model"])
        source = export.write_float_saved_model(model, tmp / "source")
        for kind in ("float32", "float16", "dynamic"):
            paths[f"tflite_{kind}"] = tmp / f"{kind}.tflite"
            paths[f"tflite_{kind}"].write_bytes(export.convert_tflite(source, kind))
        rates = []
        for name, path in paths.items():
            embedder = retrieval.load_embedder(path)
            embedder(images)  # warm-up (tracing, allocation)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                embedder(images)
                times.append(time.perf_counter() - start)
            rates.append((name, batch / float(np.median(times))))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--embed", action="store_true", help="also measure embedding images/s per model format")
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(search_case(args.child)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    print(f"# {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    print("| case | queries × gallery × dim | search (s) | matmul (s) | search / matmul | traced peak (MiB) "
          "| RSS before (MiB) | max RSS (MiB) | full matrix (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['case']} | {r['queries']:,} × {r['gallery']:,} × {r['dim']} | {r['search_s']:.2f} "
              f"| {r['matmul_s']:.2f} | {r['search_s'] / r['matmul_s']:.2f} | {r['traced_mib']:.0f} "
              f"| {r['rss_before_mib']:.0f} | {r['max_rss_mib']:.0f} | {r['full_matrix_mib']:.0f} |", flush=True)
    if args.embed:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        print("\n| model format | images/s (batch 32, 256×128) |\n|---|---|")
        for name, rate in embed_rates():
            print(f"| {name} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
