"""Searching past one machine's memory (issue 23): the faiss index against exact search, and Milvus Lite.

    python bench/bench_gallery.py search                # 10^5 gallery: exact vs index, nprobe sweep, recall@10
    python bench/bench_gallery.py search --rows 80000 --factories "IVF256,PQ128" "PCA256,IVF1024,SQ8"
    python bench/bench_gallery.py build --rows 1000000  # 10^6: index build time and peak memory on 2 threads
    python bench/bench_gallery.py milvus --rows 20000   # Milvus Lite (in-process) against exact search

The gallery is clustered and re-id-like (`clustered`): identities × crops of 2,048-d L2-normalised vectors.
Each identity has a centre drawn from a power-law spectrum (variance of latent component i ∝ 1/i, 1,024
components mixed into 2,048 dimensions by a fixed random matrix); each crop adds a camera offset (6 cameras,
0.3 of the identity spread), pose variation along the same components (0.5 of it) and isotropic noise, so
that crops of one person have cosine ≈ 0.65 with each other and ≈ 0 with other people. ``--hard`` puts all of
the within-identity variation along the identity components (0.7 of the spread, no isotropic noise): crops of
a person then scatter over more of the index's lists. Queries are new crops of gallery identities.

Each measurement runs in a fresh subprocess (its own peak memory), on the features file written once per
size under --work (default /tmp/rga_bench_gallery; 8 GiB at 10^6 rows). Reported:
  recall@10   |index top 10 ∩ exact top 10| / 10, mean over queries (exact = rga_keras.retrieval.search)
  speed-up    exact search time / index search time, same queries, same process, features in the page cache,
              each the best of --repeat runs (3)
  index size  the .faiss file against the features (rows × 2,048 × 4 bytes)
  build       wall time of build_index (train on a sample, add in chunks, save) and its peak RSS (VmHWM)
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
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DIM, PER_ID, RANK, CAMERAS = 2048, 16, 1024, 6
CHUNK = 20_000


def clustered(rows: int, queries: int, hard: bool = False, seed: int = 0):
    """Chunks of (gallery vectors, paths) and the query vectors of the module doc's gallery."""
    import numpy as np

    rng = np.random.default_rng(seed)
    spread = (1.0 / np.arange(1, RANK + 1)) ** 0.5
    mixing = rng.standard_normal((RANK, DIM), dtype=np.float32) / np.float32(np.sqrt(RANK))
    identities = rows // PER_ID
    centres = rng.standard_normal((identities, RANK), dtype=np.float32) * spread.astype(np.float32)
    cameras = 0.3 * rng.standard_normal((CAMERAS, RANK), dtype=np.float32) * spread.astype(np.float32)
    pose, noise = (0.7, 0.0) if hard else (0.5, 0.02)

    def crops(ids, cams, generator):
        latent = centres[ids] + cameras[cams]
        latent += pose * generator.standard_normal(latent.shape, dtype=np.float32) * spread.astype(np.float32)
        x = latent @ mixing
        if noise:
            x += noise * generator.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks():
        generator = np.random.default_rng(seed + 1)
        for start in range(0, identities * PER_ID, CHUNK):
            index = np.arange(start, min(start + CHUNK, identities * PER_ID))
            ids, cams = index // PER_ID, generator.integers(0, CAMERAS, len(index))
            yield crops(ids, cams, generator), [f"/gallery/{i // PER_ID:07d}_c{c + 1}s1_{i:08d}_00.jpg"
                                                for i, c in zip(index, cams)]

    query_rng = np.random.default_rng(seed + 2)
    query = crops(query_rng.integers(0, identities, queries), query_rng.integers(0, CAMERAS, queries), query_rng)
    return chunks, identities * PER_ID, query


SOURCE = {"model": "/bench/clustered", "model_sha256": "0" * 64, "model_format": "keras", "feature": "after_bn",
          "input_size": [256, 128], "flip": False}


def features_file(work: Path, rows: int, hard: bool) -> Path:
    """The gallery's features file (written once, in chunks)."""
    from rga_keras.retrieval.features import write_feature_chunks

    path = work / f"clustered_{rows}{'_hard' if hard else ''}.h5"
    if not path.exists():
        chunks, total, _ = clustered(rows, 1, hard)
        write_feature_chunks(path, SOURCE, chunks(), (total, DIM))
    return path


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def timed(work, repeat: int):
    """``work()``'s result and its best wall time of ``repeat`` runs (the others' jobs only ever add time)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return result, min(times)


def run_search(args) -> dict:
    """Exact against the index (each factory, each nprobe), on the same queries."""
    import faiss
    import numpy as np

    from rga_keras import retrieval

    path = features_file(args.work, args.rows, args.hard)
    _, _, query = clustered(args.rows, args.queries, args.hard)
    out = {"rows": args.rows, "queries": args.queries, "hard": args.hard, "threads": faiss.omp_get_max_threads()}
    with retrieval.FileGallery(path) as gallery:
        np.asarray(gallery.features).sum()  # page the features in: both searches read them from the page cache
        exact, out["exact_s"] = timed(lambda: gallery.search(query, 10), args.repeat)
    out["features_mib"] = args.rows * DIM * 4 / 2**20
    out["factories"] = []
    for factory in args.factories or [None]:
        start = time.perf_counter()
        saved = retrieval.build_index(path, factory=factory, verbose=0)
        built = {"factory": factory, "build_s": time.perf_counter() - start,
                 "index_mib": saved.stat().st_size / 2**20, "runs": []}
        for nprobe in args.nprobe:
            with retrieval.IndexedGallery(path, nprobe=nprobe, shortlist=args.shortlist) as gallery:
                built["factory"] = gallery.header["factory"]
                hits, seconds = timed(lambda: gallery.search(query, 10), args.repeat)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits.ids, exact.ids)]))
            built["runs"].append({"nprobe": nprobe, "search_s": seconds, "recall": recall})
        out["factories"].append(built)
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_anon_mib"] = _status_mib("RssAnon")
    return out


class PeakMemory:
    """Peak anonymous and file-backed resident memory, sampled every 50 ms in a thread (VmHWM has no split)."""

    def __enter__(self) -> "PeakMemory":
        import threading

        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.anon, self.file = max(self.anon, _status_mib("RssAnon")), max(self.file, _status_mib("RssFile"))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_build(args) -> dict:
    """build_index of a large file: wall time, peak memory (the features are read through HDF5 and pread)."""
    import faiss

    from rga_keras import retrieval

    path = features_file(args.work, args.rows, args.hard)
    rss_before = _status_mib("VmRSS")
    start = time.perf_counter()
    with PeakMemory() as peak:
        saved = retrieval.build_index(path, factory=args.factories[0] if args.factories else None, verbose=0)
    seconds = time.perf_counter() - start
    with retrieval.IndexedGallery(path) as gallery:
        factory, nprobe = gallery.header["factory"], gallery.nprobe
    return {"rows": args.rows, "threads": faiss.omp_get_max_threads(), "build_s": seconds, "factory": factory,
            "nprobe": nprobe, "rss_before_mib": rss_before, "peak_anon_mib": peak.anon, "peak_file_mib": peak.file,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "index_mib": saved.stat().st_size / 2**20, "features_mib": args.rows * DIM * 4 / 2**20}


def run_milvus(args) -> dict:
    """Milvus Lite in this process: insert the gallery, search the queries, recall against exact."""
    import shutil

    import numpy as np

    from rga_keras import retrieval

    path = features_file(args.work, args.rows, args.hard)
    _, _, query = clustered(args.rows, args.queries, args.hard)
    with retrieval.FileGallery(path) as gallery, retrieval.open_features(path) as features:
        exact, exact_s = timed(lambda: gallery.search(query, 10), args.repeat)
        uri = args.work / f"milvus_{args.rows}.db"
        shutil.rmtree(uri, ignore_errors=True)
        start = time.perf_counter()
        with retrieval.MilvusGallery(uri, create_for=(SOURCE, DIM), index_type=args.milvus_index) as milvus:
            ids = []
            for vectors, paths in features.chunks(CHUNK):
                ids += milvus.append(retrieval.FeatureSet(vectors, paths, SOURCE),
                                     [retrieval.Crop(p) for p in paths])
            load_s = time.perf_counter() - start
            hits, search_s = timed(lambda: milvus.search(query, 10), args.repeat)
            method = milvus.method
    rows_of = {milvus_id: row for row, milvus_id in enumerate(ids)}
    found = np.vectorize(lambda i: rows_of.get(int(i), -1))(hits.ids)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact.ids)]))
    size = sum(f.stat().st_size for f in uri.rglob("*") if f.is_file())
    return {"rows": args.rows, "queries": args.queries, "method": method, "load_s": load_s, "search_s": search_s,
            "exact_s": exact_s, "recall": recall, "disk_mib": size / 2**20,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def print_search(r: dict) -> None:
    print(f"\n{r['rows']:,} x {DIM} {'hard' if r['hard'] else 're-id-like'} gallery, {r['queries']:,} queries, "
          f"top 10, {r['threads']} threads: exact search {r['exact_s']:.2f} s; features {r['features_mib']:.0f} MiB; "
          f"peak RSS {r['max_rss_mib']:.0f} MiB (anonymous at the end {r['rss_anon_mib']:.0f} MiB)")
    print("| index | build (s) | index (MiB) | features / index | nprobe | search (s) | speed-up | recall@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for built in r["factories"]:
        for run in built["runs"]:
            print(f"| {built['factory']} | {built['build_s']:.1f} | {built['index_mib']:.1f} "
                  f"| {r['features_mib'] / built['index_mib']:.1f} | {run['nprobe']} | {run['search_s']:.2f} "
                  f"| {r['exact_s'] / run['search_s']:.1f} | {run['recall']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("search", "build", "milvus"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--hard", action="store_true", help="within-identity variation along identity components")
    parser.add_argument("--factories", nargs="*", help="faiss factory strings (default: the library's)")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[None], help="lists visited (default: saved)")
    parser.add_argument("--shortlist", type=int, help="candidates re-ranked exactly (default: saved)")
    parser.add_argument("--milvus-index", default="IVF_SQ8", help="Milvus index type for the milvus mode")
    parser.add_argument("--threads", type=int, default=2, help="faiss and BLAS threads (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="searches timed as the best of this many runs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rga_bench_gallery"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        if args.prepare:
            features_file(args.work, args.rows, args.hard)
            return
        print(json.dumps({"search": run_search, "build": run_build, "milvus": run_milvus}[args.mode](args)))
        return
    # OMP_WAIT_POLICY: OpenMP threads sleep rather than spin while waiting, which on a shared machine keeps faiss
    # from burning the other jobs' time (and its own: 2-5x slower builds under load otherwise)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    print(f"# {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    start = time.perf_counter()
    # the features file is written by a process of its own, so that the measuring one's peak memory is its own
    prepare = subprocess.run([sys.executable, __file__, "--child", "--prepare", *sys.argv[1:]], env=env,
                             capture_output=True, text=True)
    if prepare.returncode != 0:
        sys.exit(f"writing the gallery failed: {prepare.stderr.strip()[-2000:]}")
    out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{args.mode} failed: {out.stderr.strip()[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if args.mode == "search":
        print_search(r)
    elif args.mode == "build":
        print(f"\nbuild_index of {r['rows']:,} x {DIM} ({r['features_mib'] / 1024:.1f} GiB of features), "
              f"{r['factory']}, {r['threads']} threads: {r['build_s']:.0f} s, peak RSS {r['max_rss_mib']:.0f} MiB "
              f"({r['rss_before_mib']:.0f} MiB before; during the build at most {r['peak_anon_mib']:.0f} MiB "
              f"anonymous, {r['peak_file_mib']:.0f} MiB file-backed), index {r['index_mib']:.0f} MiB "
              f"(1/{r['features_mib'] / r['index_mib']:.0f} of the features); search default nprobe {r['nprobe']}")
    else:
        print(f"\nMilvus Lite, {r['rows']:,} x {DIM}, {r['queries']:,} queries ({r['method']}): insert + index "
              f"{r['load_s']:.0f} s, search {r['search_s']:.1f} s (exact {r['exact_s']:.1f} s), recall@10 "
              f"{r['recall']:.3f}, on disk {r['disk_mib']:.0f} MiB, peak RSS {r['max_rss_mib']:.0f} MiB")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end; {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
