"""Build the embedded default's assets (``configs/tiny.yaml``) where they do not exist yet.

The tiny model is written with ``save_pretrained`` and then loaded by the trainer through the same
``from_pretrained`` path as real Stable Diffusion weights; the datasets are synthetic Pick-a-Pic v2
parquet files (see ``data/make_synthetic_dataset.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)

TINY_TRAIN_PAIRS = 512
TINY_HELDOUT_PAIRS = 64


def ensure_tiny_assets(cfg: TrainConfig) -> None:
    """Create the tiny model and the synthetic datasets at the configured paths if they are missing."""
    from diffusion_dpo.data import synthetic
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    model = Path(cfg.pretrained_model_name_or_path)
    if not model.exists():
        logger.info("building the tiny SD model at %s", model)
        save_tiny_pipeline(model, seed=cfg.seed, resolution=cfg.resolution)
    datasets = [(cfg.dataset_name, TINY_TRAIN_PAIRS, False)]
    if cfg.validation_dataset_name:
        datasets.append((cfg.validation_dataset_name, TINY_HELDOUT_PAIRS, True))
    for path, n_pairs, heldout in datasets:
        if Path(path).exists():
            continue
        logger.info(
            "writing %d synthetic %s pairs to %s", n_pairs, "held-out" if heldout else "training", path
        )
        if cfg.effective_objective == "kto" and not heldout:
            synthetic.write_unpaired_dataset(path, n_pairs, seed=cfg.seed, resolution=cfg.resolution)
        else:
            synthetic.write_pair_dataset(
                path, n_pairs, seed=cfg.seed + int(heldout), resolution=cfg.resolution, heldout=heldout
            )
