"""Throughput of the training input pipelines (decode + resize + all augmentations) at 1 and 2 cores:
tf.data and Grain side by side.

    python bench/bench_data.py                 # print the results
    python bench/bench_data.py --write         # and replace the "## Data pipeline" section of docs/BENCHMARKS.md

Data: the synthetic dataset (100 identities × 20 images, 128×64 JPEGs, the size of Market-1501's
images; its generation is timed too), read through rga_keras.data.make_train_dataset (tf.data) and
make_grain_train_dataset (Grain, N worker processes) with the paper's settings (P×K = 16×4, 256×128
output). Each measurement runs in a fresh subprocess pinned to the first N cores (sched_setaffinity;
Grain's workers inherit it) with TensorFlow's and tf.data's thread pools set to N. The
measurements are interleaved in rounds (every case at every core count, then again), so that other
jobs on shared cores disturb all of them alike. Reported:
  images/s     wall-clock rate over the timed batches, best and median of all repeats (the best
               is the least disturbed by other jobs)
  CPU µs/img   CPU time (user + system) per image, of the process and its worker processes, median:
               the work itself, which sharing the cores inflates far less than it does the wall-clock rate
  first batch  seconds from building the pipeline to its first batch (Grain: starting the workers)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Data pipeline"
CONTROL = "control: parallel resize only, no files"
CASES = {  # name: (pipeline, make_*_train_dataset keyword arguments)
    "train, all augmentations": ("tf.data", {}),
    "train, all augmentations, cache=True": ("tf.data", {"cache": True}),
    "train, resize only (augment=False)": ("tf.data", {"augment": False}),
    "Grain: train, all augmentations": ("grain", {}),
    "Grain: train, resize only (augment=False)": ("grain", {"augment": False}),
    CONTROL: ("tf.data", None),  # a parallel resize of one in-memory image: how many cores the machine lends now
}
FULL, GRAIN_FULL = "train, all augmentations", "Grain: train, all augmentations"
WARMUP = 10


def run_child(root: str, cores: int, name: str, batches: int, repeats: int) -> dict:
    """In the child process: pin to ``cores`` cores, then time ``repeats`` × ``batches`` batches."""
    os.sched_setaffinity(0, set(range(cores)))
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, str(REPO))
    import psutil  # a need of Grain's

    from rga_keras.data import load_dataset

    pipeline, kwargs = CASES[name]
    start = time.perf_counter()
    if pipeline == "grain":
        from rga_keras.data import make_grain_train_dataset

        ds, versions = make_grain_train_dataset(load_dataset("market1501", root).train, num_ids_per_batch=16,
                                                images_per_id=4, workers=cores, **kwargs), {}
    else:
        ds, versions = _tf_dataset(root, cores, kwargs)
    iterator = iter(ds)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(WARMUP - 1):  # tracing, autotuning, file cache
        next(iterator)
    process = psutil.Process()

    def cpu_seconds() -> float:  # this process and its workers (Grain's)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])

    rates, cpu_us = [], []
    for _ in range(repeats):
        cpu, wall = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * 64 / (time.perf_counter() - wall))
        cpu_us.append((cpu_seconds() - cpu) / (batches * 64) * 1e6)
    return {"rates": rates, "cpu_us": cpu_us, "first": first, **versions}


def _tf_dataset(root: str, cores: int, kwargs: dict | None):
    """The tf.data case (``kwargs`` None: the control) on ``cores`` threads, and TensorFlow's version."""
    import tensorflow as tf

    from rga_keras.data import load_dataset, make_train_dataset

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    if kwargs is None:
        image = tf.zeros([128, 64, 3], tf.uint8)
        ds = tf.data.Dataset.from_tensors(image).repeat()
        ds = ds.map(lambda x: tf.image.resize(x, [256, 128]), num_parallel_calls=tf.data.AUTOTUNE).batch(64)
    else:
        train = load_dataset("market1501", root).train
        ds = make_train_dataset(train, num_ids_per_batch=16, images_per_id=4, **kwargs)
    return ds.with_options(options), {"tf": tf.__version__}


def measure(args) -> str:
    """Generate the data, run the interleaved rounds, and return the markdown section."""
    sys.path.insert(0, str(REPO))
    from rga_keras.data.synthetic import generate

    load_before, tf_version = os.getloadavg()[0], "?"
    results = {(name, cores): {"rates": [], "cpu_us": [], "first": []} for name in CASES for cores in args.cores}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = generate(Path(tmp) / "synthetic")
        generation = time.perf_counter() - start
        for round_ in range(args.rounds):
            for (name, cores), result in results.items():
                out = subprocess.run([sys.executable, __file__, "--child", str(root), str(cores), name,
                                      str(args.batches), str(args.repeats)], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{name} at {cores} cores failed:\n{out.stderr[-2000:]}")
                child = json.loads(out.stdout.strip().splitlines()[-1])
                result["rates"] += child["rates"]
                result["cpu_us"] += child["cpu_us"]
                result["first"].append(child["first"])
                tf_version = child.get("tf", tf_version)
                print(f"round {round_ + 1}: {name}, {cores} core(s): "
                      + ", ".join(f"{r:,.0f}" for r in child["rates"]) + " images/s", flush=True)
    load_after = os.getloadavg()[0]
    best = {key: max(r["rates"]) for key, r in results.items()}
    cpu = {key: statistics.median(r["cpu_us"]) for key, r in results.items()}
    median = {key: statistics.median(r["rates"]) for key, r in results.items()}
    obtained = {key: statistics.median(rate * us / 1e6 for rate, us in zip(r["rates"], r["cpu_us"]))
                for key, r in results.items()}  # cores' worth of CPU time the process got
    first_batch = {key: statistics.median(r["first"]) for key, r in results.items()}
    rows = [f"| {name} | " + " | ".join(f"{best[name, c]:,.0f} / {median[name, c]:,.0f} | {cpu[name, c]:.0f} | "
                                        f"{first_batch[name, c]:.1f}" for c in args.cores) + " |" for name in CASES]
    header = " | ".join(f"{c} core{'s' if c > 1 else ''}: images/s best / median | CPU µs/img | first batch s"
                        for c in args.cores)
    first = args.cores[0]
    scaling = "; ".join(f"from {first} to {c} cores ×{best[FULL, c] / best[FULL, first]:.2f} (best) and "
                        f"×{median[FULL, c] / median[FULL, first]:.2f} (median)"
                        for c in args.cores[1:]) or "one core count measured"
    per_core = cpu[FULL, first]
    shared = any(obtained[key] < 0.9 * key[1] for key in obtained)  # a run got less than its cores
    return _wrap([
        SECTION,
        "",
        f"`python bench/bench_data.py --write` on {_cpu_model()}, {os.cpu_count()} cores, TensorFlow "
        f"{tf_version}, Grain {importlib.metadata.version('grain')}, Pillow {importlib.metadata.version('pillow')}, "
        f"{time.strftime('%Y-%m-%d')}, load average {load_before:.1f} before, "
        f"{load_after:.1f} after. " + (
            "**The cores were shared with other jobs**, so the wall-clock rates are lower bounds; the CPU "
            "time per image is the cost of the work itself." if shared else
            "Every run got the cores it was pinned to (CPU time obtained below)."),
        "",
        "Training pipelines, `make_train_dataset` (tf.data) and `make_grain_train_dataset` (Grain, N worker "
        "processes) with P×K = 16×4, 256×128 output, 128×64 JPEG inputs "
        f"(synthetic, Market-1501's image size); {args.rounds} interleaved rounds of {args.repeats} × "
        f"{args.batches} batches per case, each after {WARMUP} warm-up batches, in a fresh process pinned to "
        "the first N cores with TensorFlow's and tf.data's thread pools set to N. CPU µs/img counts the "
        "process and its workers; first batch is the time from building the pipeline to its first batch.",
        "",
        f"| case | {header} |",
        "|---|" + "---|---|---|" * len(args.cores),
        *rows,
        "",
        f"Generating the synthetic dataset (100 identities × 20 images, 128×64) took {generation:.1f} s "
        "(one process, NumPy + Pillow).",
        "",
        f"With all augmentations one core does the work of about {1e6 / per_core:,.0f} images/s "
        f"(10⁶ / {per_core:.0f} µs). Images are decoded and augmented in parallel (tf.data AUTOTUNE), so the "
        f"rate should grow with the cores the trainer leaves free; here {scaling}. "
        + ("That is not the scaling itself: " if shared else "The runs pinned to ")
        + ", ".join(f"{c} core{'s' if c > 1 else ''} obtained {obtained[FULL, c]:.2f}" for c in args.cores)
        + " cores' worth of CPU time (median of rate × CPU time per image), and the control, a plain "
        "parallel resize, "
        + ", ".join(f"{obtained[CONTROL, c]:.2f}" for c in args.cores)
        + (": the other jobs took the rest. " if shared else ", so the rates above scale with real cores. ")
        + "To keep a GPU fed, give the input pipeline at least "
        "(train-step images/s) × (CPU µs/img) / 10⁶ cores. An estimate, not a measurement: the RGA-SC train "
        "step costs about 3 × 2 × 5.05 G ≈ 30 GFLOP per 256×128 image (forward + backward, docs/DESIGN.md §1), "
        "so a GPU sustaining 300 TFLOP/s on it would consume about 10,000 images/s, the work of "
        f"{10_000 * per_core / 1e6:.1f} such cores.",
        "",
        "Grain against tf.data, all augmentations: "
        + "; ".join(f"{c} core{'s' if c > 1 else ''} ×{median[GRAIN_FULL, c] / median[FULL, c]:.2f} the images/s "
                    f"(median) at ×{cpu[GRAIN_FULL, c] / cpu[FULL, c]:.2f} the CPU time per image"
                    for c in args.cores)
        + ". Both pipelines follow one plan (`rga_keras.data.sampling`) and give the same batches; Grain's workers "
        "decode with libjpeg-turbo (`simplejpeg`), resize with Pillow's bilinear weights as sparse products, and "
        "write every batch into fresh shared memory for the main process (docs/DATA.md).",
        "",
    ])


def _wrap(lines: list[str]) -> str:
    """Wrap prose lines at 105 columns like the rest of BENCHMARKS.md; headings and table rows stay."""
    return "\n".join(line if line.startswith(("#", "|")) else
                     textwrap.fill(line, 105, break_on_hyphens=False) for line in lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "an unknown CPU"


def write_section(text: str, path: Path) -> None:
    """Replace (or append) the "## Data pipeline" section of the shared file, keeping the others."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = current.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="core counts to measure (default 1 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per round and case (default 2)")
    parser.add_argument("--batches", type=int, default=30, help="batches per timed repeat (default 30)")
    parser.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, cores, name, batches, repeats = args.child
        print(json.dumps(run_child(root, int(cores), name, int(batches), int(repeats))))
        return
    usable = len(os.sched_getaffinity(0))
    if max(args.cores) > usable:
        parser.error(f"--cores {max(args.cores)} exceeds the {usable} cores this process may use")
    text = measure(args)
    print()
    print(text)
    if args.write:
        write_section(text, REPO / "docs" / "BENCHMARKS.md")
        print(f"wrote the {SECTION!r} section of docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
