"""Write a dataset of the synthetic shapes world (diffusion_dpo.synthetic).

    python data/make_synthetic_dataset.py --output_dir data/shapes_pairs --kind pairs --n_pairs 4000

writes ``OUTPUT_DIR/train.parquet`` (training combinations of colour, shape and background),
``OUTPUT_DIR/test.parquet`` (held-out combinations only) and ``OUTPUT_DIR/heldout_prompts.txt``.
The folder loads as a parquet folder: ``load_pair_dataset(OUTPUT_DIR, split="test")``.

Kinds: ``pairs`` (Pick-a-Pic v2 columns caption, jpg_0, jpg_1, label_0, label_1, with a few ties),
``captions`` (caption, image; for pretraining a base model, with ``--caption_noise``), ``unpaired``
(caption, image, label; for Diffusion-KTO).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffusion_dpo import synthetic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--kind", choices=("pairs", "captions", "unpaired"), default="pairs")
    parser.add_argument("--n_pairs", type=int, default=2000, help="training pairs (--kind pairs)")
    parser.add_argument(
        "--n_images", type=int, default=None, help="training images (captions, unpaired); default 2 * n_pairs"
    )
    parser.add_argument(
        "--n_test", type=int, default=None, help="held-out rows; default a tenth of the training rows"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument(
        "--tie_fraction", type=float, default=0.05, help="share of tied pairs (label_0 = 0.5)"
    )
    parser.add_argument(
        "--caption_noise", type=float, default=0.0, help="captions: probability of a wrong caption"
    )
    parser.add_argument(
        "--desirable_fraction", type=float, default=0.5, help="unpaired: share of desirable images"
    )
    args = parser.parse_args(argv)
    for name in ("n_pairs", "n_images", "n_test", "resolution"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "resolution" else 0):
            parser.error(f"--{name} must be positive, got {value}")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    n_train = args.n_pairs if args.kind == "pairs" else (args.n_images or 2 * args.n_pairs)
    n_test = args.n_test if args.n_test is not None else max(1, n_train // 10)
    for split, n, heldout, seed in (
        ("train", n_train, False, args.seed),
        ("test", n_test, True, args.seed + 1),
    ):
        path = output_dir / f"{split}.parquet"
        if args.kind == "pairs":
            synthetic.write_pair_dataset(path, n, seed, args.resolution, heldout, args.tie_fraction)
        elif args.kind == "captions":
            synthetic.write_caption_dataset(path, n, seed, args.resolution, args.caption_noise, heldout)
        else:
            synthetic.write_unpaired_dataset(path, n, seed, args.resolution, args.desirable_fraction, heldout)
    (output_dir / "heldout_prompts.txt").write_text("\n".join(synthetic.heldout_prompts()) + "\n")
    return output_dir


if __name__ == "__main__":
    main()
