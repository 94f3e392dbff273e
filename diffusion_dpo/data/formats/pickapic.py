"""Pick-a-Pic v2 (Kirstain et al. 2023, arXiv 2305.01569) and its mirrors.

Card read: the original ``yuvalkirstain/pickapic_v2`` (removed from the hub in 2025, see
:mod:`diffusion_dpo.data.removed`); the live copy ``liuhuohuo2/pick-a-pic-v2`` keeps its columns
(FIELD_2026 survey: 1,001,352 rows). Columns: ``caption``, ``jpg_0``, ``jpg_1`` (encoded images),
``label_0`` (1: image 0 won, 0: image 1 won, 0.5: a tie), plus ``label_1``, ``model_0/1``,
``best_image_uid``, ``user_id``... which are not needed. Pick-a-Pic labels are one user's choice, so
only 0, 0.5 and 1 are valid; anything else is a bad row.
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import LabelError, PairFormat


def label_problem(value) -> str | None:
    """Why ``value`` is not a Pick-a-Pic ``label_0`` (0, 0.5 or 1, as an int, a float or a numpy
    scalar), or ``None`` when it is one. NaN, None, strings and any other number are bad."""
    if value is not None and not isinstance(value, str | bytes):
        try:
            if float(value) in (0.0, 0.5, 1.0):
                return None
        except (TypeError, ValueError):
            pass
    shown = value if isinstance(value, int | float) else repr(value)
    return f"label_0 {shown} is not 0, 0.5 or 1"


def _read(row: dict) -> tuple:
    return row["caption"], row["jpg_0"], row["jpg_1"]


def _label(row: dict) -> float:
    problem = label_problem(row["label_0"])
    if problem is not None:
        raise LabelError(problem)
    return float(row["label_0"])


FORMAT = PairFormat(
    name="pickapic",
    summary="Pick-a-Pic v2 and mirrors: caption, jpg_0, jpg_1, label_0 (1, 0 or 0.5 for a tie)",
    columns=("caption", "jpg_0", "jpg_1", "label_0"),
    read=_read,
    label=_label,
    label_columns=("label_0",),
)
