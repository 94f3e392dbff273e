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
    train_path = Path(cfg.dataset_name)
    if not train_path.exists():
        logger.info("writing %d synthetic training examples to %s", TINY_TRAIN_PAIRS, train_path)
        if cfg.effective_objective == "kto":
            synthetic.write_unpaired_dataset(
                train_path, TINY_TRAIN_PAIRS, seed=cfg.seed, resolution=cfg.resolution
            )
        else:
            synthetic.write_pair_dataset(
                train_path, TINY_TRAIN_PAIRS, seed=cfg.seed, resolution=cfg.resolution
            )
    if cfg.validation_dataset_name and not Path(cfg.validation_dataset_name).exists():
        # held-out pairs: the training prompts' distribution, renders never trained on (another seed)
        logger.info("writing %d held-out pairs to %s", TINY_HELDOUT_PAIRS, cfg.validation_dataset_name)
        synthetic.write_pair_dataset(
            cfg.validation_dataset_name, TINY_HELDOUT_PAIRS, seed=cfg.seed + 1, resolution=cfg.resolution
        )
