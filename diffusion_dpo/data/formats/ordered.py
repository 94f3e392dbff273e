"""Ordered pairs, this project's own winner-first form: ``caption``, ``image_w`` (preferred), ``image_l``."""

from __future__ import annotations

from diffusion_dpo.data.formats.base import PairFormat, winner_first


def _read(row: dict) -> tuple:
    return row["caption"], row["image_w"], row["image_l"]


FORMAT = PairFormat(
    name="ordered",
    summary="ordered pairs: caption, image_w (preferred), image_l",
    columns=("caption", "image_w", "image_l"),
    read=_read,
    label=winner_first,
)
