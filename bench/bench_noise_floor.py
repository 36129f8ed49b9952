"""How far a trained model's own embeddings move under perturbations no deployment avoids: the floor under
the worst-image gate of every quantised export (docs/EXPORT.md, "What a quantised model can reach").

    python bench/bench_noise_floor.py runs/demo/best.keras [--data-root DIR --dataset NAME] [--sigmas 0.5 1]

The Keras model embeds the query and gallery images (as the export's parity check reads them, pixels rounded
to uint8) and the same images perturbed: Gaussian pixel noise of standard deviation σ grey levels (an int8
model's rounding of its first activations is of this size: one step of a ~[0, 6] stem output is 0.025, about
1 % of its spread, as σ = 0.5 is of the pixels'), several draws each. It prints the per-image cosine to the
unperturbed embedding, mean and worst, for each feature. A model whose worst image falls below 0.95 here
cannot be expected to have a quantised model that passes the export's worst-image gate: that is the model's
sensitivity, not the quantiser's. A model that passes here may still fail it (pixel noise is a lower bound: a
256×128 model that ignores it still lost its worst images to int8 clipping, docs/EXPORT.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="trained .keras model")
    parser.add_argument("--data-root", help="dataset folder (default: the built-in synthetic dataset)")
    parser.add_argument("--dataset", default="synthetic", help="dataset name (default synthetic)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=(0.25, 0.5, 1.0),
                        help="pixel noise standard deviations in grey levels (default 0.25 0.5 1)")
    parser.add_argument("--draws", type=int, default=3, help="noise draws per σ (default 3)")
    parser.add_argument("--limit", type=int, help="at most this many query+gallery images (evenly spread)")
    args = parser.parse_args()

    from rga_keras.data import load_dataset, load_images
    from rga_keras.export.model import cosine_rows
    from rga_keras.models import FEATURES, load_reid_model

    model = load_reid_model(args.model)
    size = tuple(int(d) for d in model.input.shape[1:3])
    data = load_dataset(args.dataset, args.data_root)
    images = np.clip(np.rint(load_images(data.query + data.gallery, size, args.limit)), 0, 255).astype(np.float32)
    rng = np.random.default_rng(0)
    print(f"{args.model}: {len(images)} query+gallery images at {size[0]}x{size[1]}; cosine of the perturbed "
          f"embedding to the unperturbed one, per image ({args.draws} draws per σ)")
    print("| feature | pixel noise σ (grey levels) | mean | worst image |")
    print("|---|---|---|---|")
    for feature in FEATURES:
        embed = model.embedding_model(feature)
        reference = embed.predict(images, batch_size=32, verbose=0)
        for sigma in args.sigmas:
            per_draw = [cosine_rows(embed.predict(np.clip(images + rng.normal(0, sigma, images.shape), 0, 255)
                                              .astype(np.float32), batch_size=32, verbose=0), reference)
                        for _ in range(args.draws)]
            worst = np.min(per_draw, axis=0)
            print(f"| {feature} | {sigma:g} | {np.mean(per_draw):.5f} | {worst.min():.5f} |", flush=True)


if __name__ == "__main__":
    main()
