"""rga-train: train an RGA re-id model with model.fit (`rga_keras.training.run`).

With no arguments it runs the demo: the built-in synthetic dataset → train RGA-SC for a few minutes on
CPU → evaluate (untrained vs trained), and prints where everything went.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rga_keras.cli.common import CommandError, OneLineParser, run_command, starting

EPILOG = """examples:
  rga-train --demo                                   # synthetic data, a few minutes on CPU
  rga-train --config market1501_rga_sc --data-root ~/data/Market-1501-v15.09.15
  rga-train --config cuhk03_labeled_rga_sc --data-root ~/data/cuhk03 -o training.precision=mixed_float16
  rga-train --config market1501_baseline --data-root ~/data/market -o training.epochs=120 -o eval.flip=true
  rga-train --list-configs

Re-running the same command after an interruption (Ctrl-C, SIGTERM, SIGHUP, kill -9) resumes from RUN_DIR/backup.
A finished run, or an unfinished one of another config, is refused: choose another --run-dir or add --fresh.
Exit status: 0 done, 1 training diverged or the export failed its checks (export.enforce), 2 bad input,
128+N interrupted by signal N (129 SIGHUP, 130 SIGINT, 131 SIGQUIT, 143 SIGTERM), 70 unexpected error
(docs/RELIABILITY.md). Another rga-train writing RUN_DIR is refused, naming its pid and host.
Several machines: set TF_CONFIG on each (see docs/TRAINING.md) and run the same command."""


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
    with starting("rga-train"):
        from rga_keras.training.callbacks import TrainingDiverged
        from rga_keras.training.config import bundled_configs, config_path, demo_config, load_config
        from rga_keras.training.run import run
    if args.list_configs:
        for name, path in bundled_configs().items():
            print(f"{name:28s} {path.read_text().splitlines()[0].lstrip('# ')}")
        return 0

    state: dict = {}  # the config, once loaded: what an interruption message refers to

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
            config = load_config(None, overrides, base=demo_config())
        else:
            config = load_config(config_path(args.config), overrides)
        if args.data_root and config["dataset"]["name"] == "synthetic":
            raise CommandError(
                f"--data-root {args.data_root}: the demo config trains on the built-in synthetic dataset, generated "
                "in the cache, so your folder would be ignored (or filled with synthetic images); to train on it "
                "pass --config (rga-train --list-configs) or -o dataset.name=market1501 (or folder, csv, ...)")
        state["config"] = config
        result = run(config, verbose=0 if args.quiet else 1, fresh=args.fresh, log=say)
        print_summary(result)
        export = result.get("export")
        return 1 if export and not export["passed"] and config["export"]["enforce"] else 0

    def kept() -> str:
        config = state.get("config")
        if config is None:
            return "nothing was written"
        if not config["training"]["backup"]:
            return "training.backup is off, so a re-run starts over"
        return (f"re-run the same command to resume after the last completed epoch ({config['run_dir']}/backup; "
                "the epoch in progress is redone)")

    return run_command("rga-train", work, on_interrupt=kept, failures=(TrainingDiverged,))


def print_summary(result: dict) -> None:
    """What the run produced and where it went, for the terminal."""
    if not result["chief"]:
        print(f"\ntraining: {result['epochs']} epochs done on this worker; the chief (worker 0) evaluates and "
              "writes the model, history, summary and export into its run_dir")
        return
    selected = "  (eval.feature: selects best.keras" + (", exported)" if "export" in result else ")")

    def rows(label: str, results: dict | None) -> list[str]:
        if results is None:
            return [f"{label:16s}: –"]
        lines = []
        for name, m in results.items():
            mark = selected if name == result["eval_feature"] else ""
            head = f"{label:16s}:" if not lines else " " * 17
            lines.append(f"{head} {name:9s}  Rank-1 {100 * m['rank1']:5.1f}  mAP {100 * m['mAP']:5.1f}  "
                         f"mINP {100 * m['mINP']:5.1f}{mark}")
        return lines

    print("\n" + result["dataset"])
    print("\n".join(rows("untrained model", result["untrained"]) + rows("trained model", result["final"])))
    print(f"{'training':16s}: {result['epochs']} epochs, {result['train_seconds']} s")
    for name, path in result["artefacts"].items():
        print(f"{name:16s}: {path}")
    print(f"{'summary':16s}: {Path(result['run_dir']) / 'summary.json'}")



def say(line: str) -> None:
    """What the run reports on the way, at once (a pipe or a log file would otherwise hold it back)."""
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
