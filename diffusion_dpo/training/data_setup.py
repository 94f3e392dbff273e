"""Build the training and validation data loaders."""

from __future__ import annotations

import logging

import torch

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)


def make_loader(
    dataset_name: str,
    *,
    split: str = "train",
    resolution: int,
    batch_size: int,
    sdxl: bool,
    seed: int = 0,
    train: bool = False,
    kto: bool = False,
    images_only: bool = False,
    random_crop: bool = False,
    hflip: bool = True,
    proportion_empty_prompts: float = 0.0,
    streaming: bool = False,
    keep_ties: bool = False,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of transformed pairs (or unpaired images with ``kto``).

    ``images_only``: a ``caption, image`` dataset (SFT / pretraining on plain captioned images).
    ``train``: shuffled, random crops/flips/caption dropout as asked, incomplete last batch dropped.
    Otherwise: dataset order, center crops, no flips, no caption dropout (held-out evaluation).
    """
    from diffusion_dpo.data.pairs import load_pair_dataset
    from diffusion_dpo.data.transforms import PairTransform, collate_pairs, make_torch_dataset

    transform_args = dict(
        resolution=resolution,
        center_crop=not (random_crop and train),
        random_flip=hflip and train,
        proportion_empty_prompts=proportion_empty_prompts if train else 0.0,
        sdxl=sdxl,
        seed=seed,
    )
    load_args = dict(split=split, streaming=streaming, max_train_samples=max_samples, cache_dir=cache_dir)
    if kto or images_only:
        from diffusion_dpo.data.unpaired import (
            UnpairedTransform,
            collate_unpaired,
            load_caption_dataset,
            load_unpaired_dataset,
        )

        load = load_unpaired_dataset if kto else load_caption_dataset
        dataset = make_torch_dataset(load(dataset_name, **load_args), UnpairedTransform(**transform_args))
        collate = collate_unpaired
    else:
        rows = load_pair_dataset(dataset_name, keep_ties=keep_ties, **load_args)
        dataset = make_torch_dataset(rows, PairTransform(**transform_args))
        collate = collate_pairs
    is_stream = isinstance(dataset, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and not is_stream,
        collate_fn=collate,
        num_workers=num_workers,
        drop_last=train,
        # Its own generator: creating a loader iterator (also when resuming) then never draws from the
        # global RNG, whose restored state must produce the same noise as the uninterrupted run.
        generator=torch.Generator().manual_seed(seed),
    )


def is_caption_image_dataset(dataset_name: str, split: str = "train", cache_dir: str | None = None) -> bool:
    """True for a plain ``caption, image`` dataset (no pair columns, no KTO label)."""
    from diffusion_dpo.data.pairs import column_names, load_rows

    names = set(column_names(load_rows(dataset_name, split, streaming=True, cache_dir=cache_dir)))
    return "image" in names and not names & {"jpg_0", "image_w", "label"}


def build_train_dataloader(cfg: TrainConfig, is_sdxl: bool) -> torch.utils.data.DataLoader:
    """Shuffled (map-style) or streamed training pairs; unpaired images for ``objective: kto``; for
    ``sft`` also plain ``caption, image`` datasets (e.g. to pretrain a base model)."""
    images_only = cfg.effective_objective == "sft" and is_caption_image_dataset(
        cfg.dataset_name, cfg.dataset_split, cfg.cache_dir
    )
    return make_loader(
        cfg.dataset_name, split=cfg.dataset_split, resolution=cfg.resolution, batch_size=cfg.train_batch_size,
        sdxl=is_sdxl, seed=cfg.seed, train=True, kto=cfg.effective_objective == "kto", images_only=images_only,
        random_crop=cfg.random_crop, hflip=not cfg.no_hflip, proportion_empty_prompts=cfg.proportion_empty_prompts,
        streaming=cfg.streaming, keep_ties=cfg.keep_ties, max_samples=cfg.max_train_samples,
        cache_dir=cfg.cache_dir, num_workers=cfg.dataloader_num_workers,
    )  # fmt: skip


def build_validation_dataloader(cfg: TrainConfig, is_sdxl: bool) -> torch.utils.data.DataLoader:
    """Held-out pairs in a fixed order, center-cropped, no flips, no caption dropout."""
    return make_loader(
        cfg.validation_dataset_name, split=cfg.validation_split, resolution=cfg.resolution,
        batch_size=cfg.train_batch_size, sdxl=is_sdxl, seed=cfg.seed, cache_dir=cfg.cache_dir,
    )  # fmt: skip
