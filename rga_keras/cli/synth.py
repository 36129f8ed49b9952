"""rga-synth: write a synthetic person re-id dataset in the Market-1501 layout (`rga_keras.data.synthetic`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rga_keras.cli.common import CommandError, OneLineParser, run_command, starting


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="rga-synth",
        description="Write a synthetic person re-id dataset in the Market-1501 layout (bounding_box_train/, "
                    "bounding_box_test/, query/) that rga_keras.data.load_dataset('market1501', OUT) reads.")
    parser.add_argument("out", type=Path, help="output folder (must not exist or be empty, unless --force)")
    parser.add_argument("--ids", type=int, default=100, help="number of identities, half train / half test "
                        "(default 100)")
    parser.add_argument("--images-per-id", type=int, default=20, help="images per identity (default 20, >= 4)")
    parser.add_argument("--cameras", type=int, default=6, help="number of cameras (default 6, >= 2)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"),
                        help="image height and width in pixels (default 128 64, as Market-1501)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a dataset rga-synth made (never a folder of other files)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with starting("rga-synth"):
        from rga_keras.data.readers import load_dataset
        from rga_keras.data.synthetic import generate

    def work() -> int:
        start = time.perf_counter()
        if args.out.is_dir() and any(args.out.iterdir()) and not args.force:
            raise CommandError(f"{args.out} exists and is not empty; pass --force to replace it (only a dataset "
                               "rga-synth made is replaced)")
        out = generate(args.out, num_ids=args.ids, images_per_id=args.images_per_id, num_cameras=args.cameras,
                       image_size=tuple(args.size), seed=args.seed, overwrite=args.force)
        print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
        print(load_dataset("market1501", out).summary())
        return 0

    return run_command("rga-synth", work,
                       on_interrupt=lambda: f"nothing was written to {args.out} (the partial copy was removed)")


if __name__ == "__main__":
    sys.exit(main())
