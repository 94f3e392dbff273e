"""Encode a pair dataset once with a model's VAE and text encoder(s), for ``train_sd.py --latents_cache``.

    python data/precompute_latents.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --dataset_name liuhuohuo2/pick-a-pic-v2 --streaming --output_dir cache/pickapic_sd15 --resolution 512
    python train_sd.py --config configs/sd15_dpo.yaml --latents_cache cache/pickapic_sd15

writes OUTPUT_DIR/shard-*.arrow (per pair: the VAE posterior mean and std of both images, unflipped
and flipped, and the caption's text embeddings; SDXL adds the pooled embedding, original sizes and
crops, SD3 the pooled embedding), empty_prompt.safetensors (for caption dropout) and manifest.json
(model, resolution, source, counts). Row i of the cache is row i of the dataset as the trainer loads
it (ties dropped unless --keep_ties; pairs with a bad label_0 left out); an image that does not decode
is kept as a row marked bad, which training skips and counts as it would from the images. The trainer
refuses a cache made with another model, resolution, tie policy or, for SD3, T5 setting (--drop_t5,
--max_sequence_length). An interrupted run resumes when rerun (its complete shards are kept). See
diffusion_dpo/data/latent_cache.py for the format.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from diffusion_dpo.data.latent_cache_writer import write_latent_cache


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="the model train_sd.py will train (hub id or folder)",
    )
    parser.add_argument("--revision", default=None, help="hub revision of the model")
    parser.add_argument("--variant", default=None, help="weight variant of the model files, e.g. fp16")
    parser.add_argument(
        "--vae_model_name_or_path", default=None, help="another VAE, as train_sd.py's flag of that name"
    )
    parser.add_argument(
        "--drop_t5", action="store_true", help="SD3: encode captions without T5, as train_sd.py --drop_t5"
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3: T5 tokens per caption, as train_sd.py's flag (default: its default, 77)",
    )
    parser.add_argument(
        "--dataset_name", required=True, help="pairs in any form train_sd.py's --dataset_name reads"
    )
    parser.add_argument("--dataset_split", default="train", help="split of the dataset")
    parser.add_argument("--cache_dir", default=None, help="where `datasets` and the hub cache downloads")
    parser.add_argument(
        "--streaming", action="store_true", help="stream the dataset (for sets too large for disk)"
    )
    parser.add_argument(
        "--keep_ties", action="store_true", help="keep tied pairs (train with --keep_ties too)"
    )
    parser.add_argument("--output_dir", required=True, help="the cache folder (new, or an interrupted cache)")
    parser.add_argument("--resolution", type=int, default=512, help="train_sd.py's --resolution (SDXL: 1024)")
    parser.add_argument(
        "--no_hflip",
        action="store_true",
        help="encode unflipped images only (half the size; only for training with --no_hflip)",
    )
    parser.add_argument(
        "--mixed_precision",
        default="no",
        choices=("no", "fp16", "bf16"),
        help="dtype the encoders run in, as train_sd.py's flag (SDXL's own VAE stays fp32)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="pairs per encoder pass")
    parser.add_argument(
        "--shard_size",
        type=int,
        default=2000,
        help="pairs per shard file; with --streaming training, keep more shards than GPUs x DataLoader workers",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="processes that decode images (not with --streaming)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = write_latent_cache(
        args.output_dir, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        dataset_name=args.dataset_name, resolution=args.resolution, split=args.dataset_split,
        revision=args.revision, variant=args.variant, vae_model_name_or_path=args.vae_model_name_or_path,
        drop_t5=args.drop_t5, max_sequence_length=args.max_sequence_length, keep_ties=args.keep_ties, hflip=not args.no_hflip, streaming=args.streaming, cache_dir=args.cache_dir,
        mixed_precision=args.mixed_precision, batch_size=args.batch_size, shard_size=args.shard_size,
        num_workers=args.dataloader_num_workers, device=device, overwrite=args.overwrite,
    )  # fmt: skip
    stats = manifest["stats"]
    print(
        f"{manifest['num_rows']} pairs in {args.output_dir} ({len(manifest['shards'])} shards); "
        f"{stats['bad_rows']} bad rows kept marked (training skips them), {stats['bad_labels']} pairs with "
        f"a bad label_0 and {stats['ties_dropped']} ties left out. Train with: --latents_cache {args.output_dir}"
    )
    for example in stats["bad_row_examples"]:
        print(f"  bad row: {example}")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, no stack trace
        sys.exit(f"error: {err}")
