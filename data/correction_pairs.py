"""Correction pairs: a given image of a caption is preferred over the model's own sample for it.

    python data/correction_pairs.py --model outputs/sd15-dpo --dataset data/captioned.parquet \\
        --output mined/corrections --samples_per_caption 2 --seed 0 \\
        --num_inference_steps 50 --resolution 512 --batch_size 8 --device cuda --dtype fp16
    accelerate launch train_sd.py --config configs/sd15_lora.yaml --dataset_name mined/corrections

``--dataset`` holds ``caption, image`` rows (names changed with ``--caption_column``/``--image_column``):
a parquet file or folder, a ``save_to_disk`` folder, a JSONL/CSV file with image paths, or a hub id;
e.g. ``diffusion_dpo.synthetic.write_caption_dataset``. For every row and every sample
``k < N``, one pair: CHOSEN = the row's image, byte for byte; REJECTED = the model's sample of the
caption from seed ``SEED + k`` (the pairs of SPIN-Diffusion, Yuan et al. 2024). The chosen image sits
at ``jpg_0`` or ``jpg_1`` by a coin flip keyed by (seed, row, k), with ``label_0`` saying which, so
that no position is always the winner. Samples are generated and cached as in ``data/mine_pairs.py``
(``--cache_dir``, default ``OUTPUT/cache``; a repeated caption is sampled once).

Writes ``OUTPUT/train.parquet`` (``caption, jpg_0, jpg_1, label_0, label_1, seed_0, seed_1,
row_index``: the sample's seed, null for the given image, and the row in ``--dataset``) and
``OUTPUT/mining.json``. Every row is checked before anything is generated: a missing column, an empty
caption or an image that does not decode is an error naming the row.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

from diffusion_dpo.curation import corrections, mining
from diffusion_dpo.evaluation.cli import run_script
from diffusion_dpo.evaluation.generate import ModelLoadError, generate_images, resolve_model

logger = logging.getLogger("correction_pairs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers folder, hub id or LoRA output folder")
    p.add_argument(
        "--dataset", required=True, help="caption, image rows: .parquet file/folder, save_to_disk folder, "
        ".jsonl/.csv (image paths) or hub id",
    )  # fmt: skip
    p.add_argument("--split", default="train")
    p.add_argument("--caption_column", default="caption")
    p.add_argument("--image_column", default="image")
    p.add_argument("--max_rows", type=int, default=None, help="use only the first N rows")
    p.add_argument("--samples_per_caption", type=int, default=1, help="N model samples (pairs) per row")
    p.add_argument("--seed", type=int, default=0, help="sample k of each caption uses seed SEED + k")
    p.add_argument("--output", required=True, help="dataset folder: train.parquet and mining.json")
    mining.add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Write correction pairs; returns ``{"output", "dataset_file", "manifest", "num_pairs", "num_rows",
    "num_prompts", "images_generated"}`` (``num_prompts``: distinct captions).

    Bad arguments or data exit with usage and status 2; a model that does not load with one
    ``error:`` line and status 1.
    """
    return run_script(build_parser(), argv, _run, (ModelLoadError,))


def _run(parser: argparse.ArgumentParser, args) -> dict:
    import pyarrow as pa

    try:
        if args.samples_per_caption < 1:
            raise ValueError(f"--samples_per_caption must be >= 1, got {args.samples_per_caption}")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.max_rows is not None and args.max_rows < 1:
            raise ValueError(f"--max_rows must be >= 1, got {args.max_rows}")
        spec = resolve_model("model", args.model)
        settings = mining.generation_settings(args)
        rows, captions, base_dir, description = corrections.read_captioned_rows(
            args.dataset, args.split, args.caption_column, args.image_column, args.max_rows
        )
    except (ValueError, FileNotFoundError) as err:  # incl. BadRowError, which names the row
        parser.error(str(err))

    t0 = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    unique = {c: j for j, c in enumerate(dict.fromkeys(captions))}  # caption -> its row in paths
    seeds = [args.seed + k for k in range(args.samples_per_caption)]
    paths, n_generated = generate_images(
        spec, list(unique), seeds, settings, cache_dir,
        device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip

    extra = [("seed_0", pa.int64()), ("seed_1", pa.int64()), ("row_index", pa.int64())]
    pairs = corrections.correction_rows(
        rows, captions, base_dir, args.image_column, unique, seeds, paths, args.seed
    )
    dataset_file = mining.write_pairs(output, pairs, extra)
    counts = {
        "rows": len(captions),
        "captions": len(unique),
        "samples": len(unique) * len(seeds),
        "images_generated": n_generated,
        "pairs": len(captions) * len(seeds),
    }
    manifest = {
        "kind": "correction",
        "model": {"source": spec.source, "kind": spec.kind, "base": spec.base},
        "dataset": {"source": args.dataset, "description": description, "split": args.split,
                    "caption_column": args.caption_column, "image_column": args.image_column,
                    "max_rows": args.max_rows},
        "samples_per_caption": args.samples_per_caption,
        "seeds": seeds,
        "position": "chosen at jpg_0 or jpg_1 by a coin keyed by (seed, row_index, k); label_0 says which",
        "generation": asdict(settings),
        "device": args.device,
        "cache_dir": str(cache_dir),
        "counts": counts,
        "dataset_file": str(dataset_file),
        "elapsed_s": round(time.time() - t0, 2),
    }  # fmt: skip
    manifest_file = mining.write_manifest(output, manifest)
    print(
        f"wrote {counts['pairs']} correction pairs ({len(captions)} rows x {len(seeds)} samples; "
        f"{len(unique)} distinct captions, {n_generated} images generated now) -> {dataset_file}"
    )
    return {
        "output": str(output),
        "dataset_file": str(dataset_file),
        "manifest": str(manifest_file),
        "num_pairs": counts["pairs"],
        "num_rows": counts["rows"],
        "num_prompts": counts["captions"],
        "images_generated": n_generated,
    }


if __name__ == "__main__":
    main()
