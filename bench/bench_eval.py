"""Time and peak memory of rga_keras.evaluation.evaluate on Market-1501 and MSMT17 sized inputs.

    python bench/bench_eval.py                      # all cases
    python bench/bench_eval.py --cases market msmt  # a subset

Random float32 features (the metrics are meaningless, the cost is not: it does not depend on the
values). Each case runs in a fresh subprocess so that ru_maxrss is its own. Reported:
  time      wall-clock seconds of the evaluate() call (features already in memory)
  traced    tracemalloc peak during evaluate(): NumPy/SciPy allocations made by the call,
            on top of the inputs (BLAS scratch is not traced)
  RSS before  the child's resident memory just before the call: Python, the imported packages
            (importing rga_keras pulls in TensorFlow/Keras) and the inputs
  max RSS   the child process's peak resident memory (so max RSS - RSS before ≈ what the call adds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

CASES = {
    # name: (queries, gallery, dim, identities, cameras, rerank)
    "market": (3368, 15913, 2048, 751, 6, False),
    "market-rerank": (3368, 15913, 2048, 751, 6, True),
    "msmt": (11659, 82161, 2048, 3060, 15, False),
}


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_case(name: str) -> dict:
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from rga_keras.evaluation import evaluate

    nq, ng, dim, num_ids, num_cams, rerank = CASES[name]
    rng = np.random.default_rng(0)
    query = rng.standard_normal((nq, dim), dtype=np.float32)
    gallery = rng.standard_normal((ng, dim), dtype=np.float32)
    qids, gids = rng.integers(1, num_ids, nq), rng.integers(-1, num_ids, ng)
    qcams, gcams = rng.integers(0, num_cams, nq), rng.integers(0, num_cams, ng)
    rss_before = _current_rss_mib()
    tracemalloc.start()
    start = time.perf_counter()
    result = evaluate(query, gallery, qids, gids, qcams, gcams, metric="cosine", rerank=rerank)
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "case": name, "queries": nq, "gallery": ng, "dim": dim, "rerank": rerank, "seconds": seconds,
        "traced_mib": traced / 2**20, "rss_before_mib": rss_before,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "inputs_mib": (query.nbytes + gallery.nbytes) / 2**20, "mAP": result["mAP"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child)))
        return
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
          f"(shared with other jobs), Python {platform.python_version()}")
    print("| case | queries × gallery × dim | re-rank | time (s) | traced peak (MiB) | RSS before (MiB) "
          "| max RSS (MiB) | inputs (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['case']} | {r['queries']:,} × {r['gallery']:,} × {r['dim']} | {'yes' if r['rerank'] else 'no'} "
              f"| {r['seconds']:.1f} | {r['traced_mib']:.0f} | {r['rss_before_mib']:.0f} | {r['max_rss_mib']:.0f} "
              f"| {r['inputs_mib']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
