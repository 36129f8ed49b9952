"""The main job end to end: rga-train (the paper's recipes) on a synthetic set of Market-1501's size, against
bench_model.py's train step in the same call (docs/BENCHMARKS.md, "rga-train end to end").

    KERAS_BACKEND=jax python bench/bench_train.py --out OUT            # what bench/run_gpu_train.sh runs on a GPU
    KERAS_BACKEND=jax python bench/bench_train.py --out OUT --tiny     # minutes on a CPU: the same steps, tiny sizes

The data: ``rga-synth`` writes 1,502 identities × 26 images (128×64 JPEGs), which are then cut down to
Market-1501's counts (751 training identities with 12,936 crops, 3,368 queries, 15,913 gallery images; the
surplus queries become gallery images), once, into OUT/market_sized. Each config then trains in its own process
(``rga_keras.training.run.run``, as rga-train runs it, with a timing callback) and reports:

  first step s      from the process's start to the end of the first training step: imports, reading the
                    dataset, building the model, the untrained evaluation, compiling the step
  epoch img/s       images per second of each epoch after the first (which holds the compilation), from the
                    end of its first step to the end of its last, so the step that waits for the epoch's
                    evaluation is left out; the median over those epochs
  input wait ms     how long the training loop waited for each batch from the input pipeline (median)
  evaluation s      wall time of each evaluation: query and gallery features, ranking (untrained, final)
  peak GiB          the accelerator's peak memory (its max RSS on CPU)

bench_model.py's train step (cross entropy only, the model's state donated, no input pipeline) runs for the same
models, precision and batch in the same call; every ratio is of figures from this one call.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()  # the process's start, near enough: before Keras, the backend and the data load
REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"market1501_rga_sc": "rga_sc_fused", "market1501_baseline": "baseline"}  # recipe → bench_model config
# Small enough for a CPU: 16 identities, the smallest network at 32×32, 2 steps of 4×2 images per epoch.
TINY = {"ids": 16, "images_per_id": 4, "overrides": [
    "model.input_size=[32, 32]", "model.rga_stages=[4]", "sampler.num_ids_per_batch=4", "sampler.images_per_id=2",
    "training.steps_per_epoch=2", "eval.batch_size=32"]}


def make_market_sized(root: Path) -> Path:
    """A synthetic dataset with Market-1501's counts (`rga_keras.data.OFFICIAL_COUNTS`), made once."""
    from rga_keras.data import OFFICIAL_COUNTS

    if (root / "query").is_dir():
        return root
    counts = {split: n for split, (_, n) in OFFICIAL_COUNTS["market1501"].items()}
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _synth(staging, ids=1502, images_per_id=26)  # 751 test and 751 training identities × 26 images
    rng = random.Random(0)
    train, query = (sorted((staging / folder).iterdir()) for folder in ("bounding_box_train", "query"))
    for path in rng.sample(train, len(train) - counts["train"]):
        path.unlink()
    for path in rng.sample(query, len(query) - counts["query"]):  # surplus queries join the gallery
        path.rename(staging / "bounding_box_test" / path.name)
    gallery = sorted((staging / "bounding_box_test").iterdir())
    for path in rng.sample(gallery, len(gallery) - counts["gallery"]):
        path.unlink()
    staging.rename(root)
    return root


def _synth(out: Path, ids: int, images_per_id: int) -> None:
    """``rga-synth OUT --ids N --images-per-id M`` (Market-1501's layout, 128×64 JPEGs)."""
    subprocess.run([sys.executable, "-m", "rga_keras.cli.synth", str(out), "--ids", str(ids),
                    "--images-per-id", str(images_per_id)], check=True, cwd=REPO)


def child(recipe: str, data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """In the config's own process: rga-train's run with timings."""
    import keras

    from rga_keras.evaluation import features
    from rga_keras.training.config import config_path, load_config
    from rga_keras.training import run as run_module
    from rga_keras.training.run import run

    config = load_config(config_path(recipe), [f"dataset.root={data}", f"run_dir={run_dir}", *overrides])
    timer = StepTimer()
    evaluations = []
    evaluate = features.evaluate_model

    def timed_evaluation(*args, **kwargs):
        start = time.perf_counter()
        result = evaluate(*args, **kwargs)
        evaluations.append(time.perf_counter() - start)
        return result

    features.evaluate_model = timed_evaluation
    train_input = run_module._train_input
    run_module._train_input = lambda *args, **kwargs: timed_stream(train_input(*args, **kwargs), timer.waits)
    result = run(config, verbose=0, fresh=True, log=lambda line: print(line, flush=True), callbacks=[timer.callback])
    batch = config["sampler"]["num_ids_per_batch"] * config["sampler"]["images_per_id"]
    rates = [batch * (len(ends) - 1) / (ends[-1] - ends[0]) for ends in timer.epochs[1:] if len(ends) > 1]
    from bench_model import _machine, _peak_memory

    peak, device = _peak_memory()
    return {"recipe": recipe, "machine": _machine(), "backend": keras.backend.backend(), "batch": batch,
            "steps_per_epoch": result["steps_per_epoch"], "epochs": result["epochs"],
            "first_step_s": timer.epochs[0][0] - START, "epoch_images_per_s": rates,
            "median_epoch_images_per_s": statistics.median(rates) if rates else None,
            "input_wait_ms": [1e3 * w for w in timer.waits],
            "median_input_wait_ms": 1e3 * statistics.median(timer.waits[1:] or timer.waits),
            "evaluation_s": evaluations, "peak_bytes": peak, "device": device,
            "final": result["final"], "train_seconds": result["train_seconds"]}


class StepTimer:
    """The end of every training step (`epochs`: one list per epoch) and the input pipeline's waits."""

    def __init__(self) -> None:
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):
                self.epochs.append([])

            def on_train_batch_end(cb, batch, logs=None):
                self.epochs[-1].append(time.perf_counter())

        self.callback, self.epochs, self.waits = Callback(), [], []


def timed_stream(dataset, waits: list[float]):
    """``dataset`` (Grain) whose latest iterator records in ``waits`` how long each ``next()`` took; a tf.data
    stream (TensorFlow) is left as it is, its waits unmeasured."""
    import grain

    if not isinstance(dataset, grain.IterDataset):
        return dataset

    class Timed(grain.IterDataset):
        def __iter__(self):
            waits.clear()  # Keras reads a few batches first to learn their shapes, then iterates afresh
            return Iterator(self._parent.__iter__())

    class Iterator(grain.DatasetIterator):
        def __next__(self):
            start = time.perf_counter()
            element = next(self._parent)
            waits.append(time.perf_counter() - start)
            return element

        def get_state(self):
            return self._parent.get_state()

        def set_state(self, state):
            self._parent.set_state(state)

    return Timed(dataset)


def measure(args) -> dict:
    """Make the data, train every recipe in its own process, time bench_model.py's step; the JSON summary."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        data = out / "tiny"
        if not (data / "query").is_dir():
            _synth(data, TINY["ids"], TINY["images_per_id"])
        overrides = TINY["overrides"]
    else:
        data, overrides = make_market_sized(out / "market_sized"), []
    overrides = [f"training.precision={args.precision}", f"training.epochs={args.epochs}",
                 f"training.eval_every={args.epochs}", "training.tensorboard=false", "export.enabled=false",
                 "model.backbone_weights=null", *overrides, *args.set]
    runs = {}
    for recipe in args.recipes:
        run_dir = out / "runs" / recipe
        cmd = [sys.executable, __file__, "--child", recipe, str(data), str(run_dir), *overrides]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        (out / f"{recipe}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise SystemExit(f"{recipe} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        runs[recipe] = {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}
        print(f"{recipe}: {_line(runs[recipe])}", flush=True)
    size = ["32", "32"] if args.tiny else ["256", "128"]
    step_json = out / "bench_model.json"
    batch = runs[args.recipes[0]]["batch"]
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_model.py"), "--train", "--batch-sizes", str(batch),
                    "--configs", *(CONFIGS[r] for r in args.recipes), "--precision", args.precision, "--repeats",
                    str(args.step_repeats), "--rounds", "1", "--size", *size, "--json", str(step_json)],
                   check=True, cwd=REPO)
    steps = {r["config"]: r for r in json.loads(step_json.read_text())["results"]}
    for recipe, result in runs.items():
        step = steps[CONFIGS[recipe]]
        result["bench_step_images_per_s"] = step["images_per_s"]
        if result["median_epoch_images_per_s"]:
            result["of_bench_step"] = result["median_epoch_images_per_s"] / step["images_per_s"]
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "precision": args.precision,
               "data": str(data), "runs": runs}
    (out / "bench_train.json").write_text(json.dumps(summary, indent=1))
    print("\n" + table(summary))
    return summary


def _line(r: dict) -> str:
    rate = r["median_epoch_images_per_s"]
    return (f"first step {r['first_step_s']:.1f} s, epochs after the first {rate:,.0f} img/s, input wait "
            f"{r['median_input_wait_ms']:.2f} ms/step, evaluations {', '.join(f'{e:.1f}' for e in r['evaluation_s'])} "
            f"s, peak {r['peak_bytes'] / 2**30:.2f} GiB ({r['device']})" if rate else "no epoch after the first")


def table(summary: dict) -> str:
    """The Markdown table of a summary, with the ratios of this call."""
    runs = summary["runs"]
    lines = ["| recipe | epoch img/s | bench step img/s | epoch / step | first step s | input wait ms/step | "
             "evaluation s (untrained, final) | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for recipe, r in runs.items():
        lines.append(f"| {recipe} | {r['median_epoch_images_per_s']:,.0f} | {r['bench_step_images_per_s']:,.0f} | "
                     f"{r.get('of_bench_step', float('nan')):.0%} | {r['first_step_s']:.1f} | "
                     f"{r['median_input_wait_ms']:.2f} | {' / '.join(f'{e:.1f}' for e in r['evaluation_s'])} | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    if {"market1501_rga_sc", "market1501_baseline"} <= set(runs):
        rga, base = runs["market1501_rga_sc"], runs["market1501_baseline"]
        lines += ["", f"RGA-SC / baseline, time per image: {base['median_epoch_images_per_s'] / rga['median_epoch_images_per_s']:.2f} "
                      f"end to end, {base['bench_step_images_per_s'] / rga['bench_step_images_per_s']:.2f} in the bench step."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the data, the runs, the logs and bench_train.json (required)")
    parser.add_argument("--recipes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precision", default="mixed_bfloat16", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run, the evaluation after the last (default 5)")
    parser.add_argument("--step-repeats", type=int, default=20, help="timed calls of bench_model.py's step")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, to try the whole command on a CPU")
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override for every run")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        recipe, data, run_dir, *overrides = args.child
        print(json.dumps(child(recipe, Path(data), Path(run_dir), overrides)))
        return 0
    if not args.out:
        parser.error("the following arguments are required: --out")
    measure(args)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "bench")]
    sys.exit(main())
