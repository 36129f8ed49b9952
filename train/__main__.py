"""rga-train: train an RGA re-id model with model.fit (python -m train --help).

With no arguments it runs the demo: the built-in synthetic dataset → train RGA-SC for a few minutes on
CPU → evaluate (untrained vs trained), and prints where everything went.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.arguments import OneLineParser, starting


CONFIG_DIR = Path(__file__).parent / "configs"

EPILOG = """examples:
  rga-train --demo                                   # synthetic data, a few minutes on CPU
  rga-train --config market1501_rga_sc --data-root ~/data/Market-1501-v15.09.15
  rga-train --config cuhk03_labeled_rga_sc --data-root ~/data/cuhk03 -o training.precision=mixed_float16
  rga-train --config market1501_baseline --data-root ~/data/market -o training.epochs=120 -o eval.flip=true
  rga-train --list-configs

Re-running the same command after an interruption (Ctrl-C, SIGTERM, kill -9) resumes from RUN_DIR/backup.
A finished run, or an unfinished one of another config, is refused: choose another --run-dir or add --fresh.
Exit status: 0 done, 1 training diverged or the export failed its checks (export.enforce), 2 bad input,
130/143 interrupted by SIGINT/SIGTERM, 70 unexpected error (docs/RELIABILITY.md).
Several machines: set TF_CONFIG on each (see docs/TRAINING.md) and run the same command."""


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"config '{name}' is neither a file nor a bundled config ({known})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="rga-train", description=__doc__, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", help="a YAML file or a bundled recipe name (see --list-configs)")
    which.add_argument("--demo", action="store_true", help="train on the built-in synthetic dataset (default)")
    parser.add_argument("--data-root", help="folder of the dataset named in the config")
    parser.add_argument("--run-dir", help="where checkpoints, logs and results go")
    parser.add_argument("--epochs", type=int, help="shortcut for -o training.epochs=N")
    parser.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. -o sampler.num_ids_per_batch=8 (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete this run's checkpoints, history and results in RUN_DIR first and start over")
    parser.add_argument("--list-configs", action="store_true", help="list the bundled recipes and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_configs:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            print(f"{path.stem:28s} {path.read_text().splitlines()[0].lstrip('# ')}")
        return 0
    with starting("rga-train"):
        from rga_keras import experiment
        from rga_keras.cli import CommandError, run_command
        from rga_keras.training import TrainingDiverged

    run: dict = {}  # the config, once loaded: what an interruption message refers to

    def work() -> int:
        demo = args.demo or not args.config
        overrides = list(args.overrides)
        if args.data_root:
            overrides.append(f"dataset.root={args.data_root}")
        if args.epochs is not None:
            overrides.append(f"training.epochs={args.epochs}")
        if args.run_dir:
            overrides.append(f"run_dir={args.run_dir}")
        if demo:
            config = experiment.load_config(None, overrides, base=experiment.demo_config())
        else:
            config = experiment.load_config(_config_path(args.config), overrides)
        if args.data_root and config["dataset"]["name"] == "synthetic":
            raise CommandError(
                f"--data-root {args.data_root}: the demo config trains on the built-in synthetic dataset, generated "
                "in the cache, so your folder would be ignored (or filled with synthetic images); to train on it "
                "pass --config (rga-train --list-configs) or -o dataset.name=market1501 (or folder, csv, ...)")
        run["config"] = config
        result = experiment.run(config, verbose=0 if args.quiet else 1, fresh=args.fresh)
        experiment.print_summary(result)
        export = result.get("export")
        return 1 if export and not export["passed"] and config["export"]["enforce"] else 0

    def kept() -> str:
        config = run.get("config")
        if config is None:
            return "nothing was written"
        if not config["training"]["backup"]:
            return "training.backup is off, so a re-run starts over"
        return (f"re-run the same command to resume after the last completed epoch ({config['run_dir']}/backup; "
                "the epoch in progress is redone)")

    return run_command("rga-train", work, on_interrupt=kept, failures=(TrainingDiverged,))


if __name__ == "__main__":
    sys.exit(main())
