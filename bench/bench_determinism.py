"""Run-to-run reproducibility and cost of ``training.deterministic`` (docs/TRAINING.md, "Reproducible runs").

One fresh process trains the demo config for 2 epochs of 25 steps (evaluation stubbed out, so only training
is timed) and prints the epoch losses at full precision and the seconds per step of epoch 2. Run it twice per
setting and compare:  python bench/bench_determinism.py false ; python bench/bench_determinism.py true
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from rga_keras.evaluation import features  # noqa: E402
from rga_keras.training import config as training_config  # noqa: E402
from rga_keras.training import run as training_run  # noqa: E402

STEPS = 25


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def main(deterministic: str) -> None:
    no_scores = {n: {"rank1": 0.0, "rank5": 0.0, "rank10": 0.0, "mAP": 0.0, "mINP": 0.0}
                 for n in ("after_bn", "before_bn")}
    features.evaluate_model = lambda *a, **k: no_scores
    timer, make_callbacks = EpochTimer(), training_run.make_callbacks
    training_run.make_callbacks = lambda *a, **k: [timer] + make_callbacks(*a, **k)
    config = training_config.load_config(None, [
        "training.epochs=2", f"training.steps_per_epoch={STEPS}", "training.eval_every=100",
        "training.tensorboard=false", "export.enabled=false", f"training.deterministic={deterministic}",
        f"run_dir={tempfile.mkdtemp()}"], base=training_config.demo_config())
    losses = training_run.run(config, verbose=0)["history"]["loss"]
    print(f"deterministic={deterministic} losses {[repr(x) for x in losses]} epoch 2: "
          f"{timer.seconds[1] / STEPS:.3f} s/step")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "false")
