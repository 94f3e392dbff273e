"""Users' own pairs as folders, CSV or JSONL: ``caption, image_0, image_1, label_0``.

``label_0`` is P(image 0 preferred): 1 or 0 for a decided pair, 0.5 for a tie, or any vote share in
between (e.g. 0.7 when 7 of 10 annotators chose image 0). Image cells are paths relative to the file's
folder (or ``--image_root``), absolute paths, or encoded bytes in parquet.
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import PairFormat, probability


def _read(row: dict) -> tuple:
    return row["caption"], row["image_0"], row["image_1"]


def _label(row: dict) -> float:
    return probability(row["label_0"], "label_0")


FORMAT = PairFormat(
    name="columns",
    summary="your own pairs: caption, image_0, image_1, label_0 (P(image 0 preferred), vote shares allowed)",
    columns=("caption", "image_0", "image_1", "label_0"),
    read=_read,
    label=_label,
    label_columns=("label_0",),
)
