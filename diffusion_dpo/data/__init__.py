"""Preference data: pair and unpaired loaders (one module per published pair format in ``formats``;
hub ids known to be gone in ``removed``), transforms and collate functions, the training order
(``order``, ``stream``), precomputed latents (``latent_cache``: the format and reading;
``latent_cache_writer``: encoding a dataset), and the parquet writers of the trainer's formats.

May import: :mod:`diffusion_dpo.models` (only the latent cache writer, which encodes with a loaded
model). Curation and the synthetic world live above it and write through :mod:`.parquet`.
"""

from diffusion_dpo.data.pairs import PairStats, load_pair_dataset, load_rows
from diffusion_dpo.data.transforms import (
    ON_BAD_EXAMPLE,
    BadRowError,
    PairTransform,
    TransformedDataset,
    TransformedIterableDataset,
    collate_pairs,
    decode_image,
    make_torch_dataset,
    row_rng,
    to_rgb,
)
from diffusion_dpo.data.unpaired import (
    UnpairedStats,
    UnpairedTransform,
    collate_unpaired,
    load_caption_dataset,
    load_unpaired_dataset,
    pairs_to_unpaired,
)

__all__ = [
    "ON_BAD_EXAMPLE",
    "BadRowError",
    "PairStats",
    "PairTransform",
    "TransformedDataset",
    "TransformedIterableDataset",
    "UnpairedStats",
    "UnpairedTransform",
    "collate_pairs",
    "collate_unpaired",
    "decode_image",
    "load_caption_dataset",
    "load_pair_dataset",
    "load_rows",
    "load_unpaired_dataset",
    "make_torch_dataset",
    "pairs_to_unpaired",
    "row_rng",
    "to_rgb",
]
