"""open-image-preferences (Data is Better Together and Rapidata, 2024; Apache-2.0).

Cards read: ``data-is-better-together/open-image-preferences-v1`` (10K Flux-vs-SD pairs annotated in
Argilla, NSFW-filtered; the raw set keeps one image folder per model and prompt variant) and its
ready-to-train ``data-is-better-together/open-image-preferences-v1-binarized``: ``prompt``, ``chosen``,
``rejected`` (images) — winner first, so the loader shuffles positions with a seeded coin. Rapidata's
``Rapidata/open-image-preferences-v1-more-results`` added 170K votes from 49,241 annotators; its rows
carry both images and the vote counts ``votes_image1``/``votes_image2``, whose share is the label.
The column names here are as far as the cards state them; a copy with other names can be renamed to
``caption, image_0, image_1, label_0`` (``--dataset_format columns``).
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import PairFormat, vote_share, winner_first


def _read_binarized(row: dict) -> tuple:
    return row["prompt"], row["chosen"], row["rejected"]


def _read_votes(row: dict) -> tuple:
    return row["prompt"], row["image1"], row["image2"]


def _label_votes(row: dict) -> float:
    return vote_share(row["votes_image1"], row["votes_image2"], "votes_image1/votes_image2")


BINARIZED = PairFormat(
    name="open_image_preferences",
    summary="open-image-preferences-v1-binarized: prompt, chosen, rejected",
    columns=("prompt", "chosen", "rejected"),
    read=_read_binarized,
    label=winner_first,
)

VOTES = PairFormat(
    name="open_image_preferences_votes",
    summary="open-image-preferences with votes (Rapidata): prompt, image1, image2, votes_image1, votes_image2",
    columns=("prompt", "image1", "image2", "votes_image1", "votes_image2"),
    read=_read_votes,
    label=_label_votes,
    label_columns=("votes_image1", "votes_image2"),
)
