"""ImageRewardDB pairs (Xu et al. 2023, ImageReward, arXiv 2304.05977).

Card read: ``zai-org/ImageRewardDB`` (formerly ``THUDM/ImageRewardDB``; Apache-2.0; 137K expert
comparisons of DiffusionDB images, validation 412 prompts / test 466). Its loading script's ``*_pair``
configurations (``1k_pair`` ... ``8k_pair``) give one row per comparison with ``prompt``,
``img_better`` and ``img_worse``: winner first, so the loader shuffles positions with a seeded coin. The
script needs ``trust_remote_code``, which current ``datasets`` refuses; convert once (``load_dataset(...,
"8k_pair").to_parquet(...)`` with an older ``datasets``) and train on the parquet files.
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import PairFormat, winner_first


def _read(row: dict) -> tuple:
    return row["prompt"], row["img_better"], row["img_worse"]


FORMAT = PairFormat(
    name="imagereward",
    summary="ImageRewardDB *_pair: prompt, img_better, img_worse",
    columns=("prompt", "img_better", "img_worse"),
    read=_read,
    label=winner_first,
)
