"""Build the training and validation data loaders from a :class:`TrainConfig`."""

from __future__ import annotations

import logging

import torch

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)


def _make_loader(cfg: TrainConfig, dataset_name: str, split: str, is_sdxl: bool, train: bool):
    from diffusion_dpo.data.pairs import load_pair_dataset
    from diffusion_dpo.data.transforms import PairTransform, collate_pairs, make_torch_dataset

    kto = cfg.effective_objective == "kto"
    common = dict(
        resolution=cfg.resolution,
        center_crop=not cfg.random_crop or not train,
        random_flip=not cfg.no_hflip and train,
        proportion_empty_prompts=cfg.proportion_empty_prompts if train else 0.0,
        sdxl=is_sdxl,
        seed=cfg.seed,
    )
    if kto and train:
        from diffusion_dpo.data.unpaired import UnpairedTransform, collate_unpaired, load_unpaired_dataset

        rows = load_unpaired_dataset(
            dataset_name, split=split, streaming=cfg.streaming, max_train_samples=cfg.max_train_samples,
            cache_dir=cfg.cache_dir,
        )  # fmt: skip
        dataset = make_torch_dataset(rows, UnpairedTransform(**common))
        collate = collate_unpaired
    else:
        rows = load_pair_dataset(
            dataset_name, split=split, streaming=cfg.streaming and train, keep_ties=cfg.keep_ties,
            max_train_samples=cfg.max_train_samples if train else None, cache_dir=cfg.cache_dir,
        )  # fmt: skip
        dataset = make_torch_dataset(rows, PairTransform(**common))
        collate = collate_pairs
    is_stream = isinstance(dataset, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        shuffle=train and not is_stream,
        collate_fn=collate,
        num_workers=cfg.dataloader_num_workers,
        drop_last=train,
        # Its own generator: creating a loader iterator (also when resuming) then never draws from the
        # global RNG, whose restored state must produce the same noise as the uninterrupted run.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_train_dataloader(cfg: TrainConfig, is_sdxl: bool):
    """Shuffled (map-style) or streamed training pairs — or unpaired images for ``objective: kto``."""
    return _make_loader(cfg, cfg.dataset_name, cfg.dataset_split, is_sdxl, train=True)


def build_validation_dataloader(cfg: TrainConfig, is_sdxl: bool):
    """Held-out pairs in a fixed order, center-cropped, no flips, no caption dropout."""
    return _make_loader(cfg, cfg.validation_dataset_name, cfg.validation_split, is_sdxl, train=False)
