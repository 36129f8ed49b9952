"""How long reading a dataset's lists takes, with the corrupt-image check reading every JPEG (the first load),
with the check's remembered verdicts (every later load), and without the check (docs/DATA.md).

    python bench/bench_dataset_load.py            # 400 synthetic identities × 20 images = 8,000 JPEGs
    python bench/bench_dataset_load.py --ids 1000

The dataset and the verdict cache live in a fresh temporary folder ($RGA_KERAS_CACHE), so the first load
really reads every image (the files themselves stay in the page cache: the figure is decoding, not disk).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=400, help="synthetic identities, 20 images each (default 400)")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads after the first (default 3)")
    args = parser.parse_args()
    os.environ["RGA_KERAS_CACHE"] = tempfile.mkdtemp(prefix="bench-dataset-load-")
    from rga_keras.data import load_dataset
    from rga_keras.data.synthetic import generate

    root = generate(os.path.join(os.environ["RGA_KERAS_CACHE"], "market"), num_ids=args.ids, images_per_id=20)

    def seconds(**kwargs) -> float:
        start = time.perf_counter()
        load_dataset("market1501", root, **kwargs)
        return time.perf_counter() - start

    first = seconds()
    again = statistics.median(seconds() for _ in range(args.repeats))
    unchecked = statistics.median(seconds(check_images=False) for _ in range(args.repeats))
    print(f"{args.ids * 20:,} images: first load (every JPEG checked) {first:.2f} s; later loads (verdicts "
          f"remembered) {again:.2f} s; without the check {unchecked:.2f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
