"""What every pair format is: which columns it reads, how a row becomes ``(caption, image_0, image_1)``,
and what its labels say about image 0.

A format never touches image data: it picks the cells (bytes, a path, or a ``{"bytes", "path"}`` dict)
and the transform decodes them later, so converting a row is as cheap for 335 GB of Pick-a-Pic as for a
test file. ``label`` reads only ``label_columns``, so the trainer can check every label of a loaded
dataset without reading one image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


class LabelError(ValueError):
    """A row's label cannot be read (the message says why, without naming the row)."""


@dataclass(frozen=True)
class PairFormat:
    """One published pair schema.

    ``read(row) -> (caption, image_0, image_1)``; ``label(row) -> p0``, the probability that image 0 is
    preferred (a vote share, 0, 0.5 or 1), or ``None`` for a winner-first row (image 0 won, and its
    position says so: the loader then shuffles positions with a seeded coin). Both are module-level
    functions, so a format pickles into DataLoader workers.
    """

    name: str
    #: One line for docs and errors: what the format is, and where it comes from.
    summary: str
    #: Columns a source must have to be read in this format.
    columns: tuple[str, ...]
    read: Callable[[dict], tuple]
    label: Callable[[dict], float | None]
    #: Columns ``label`` reads (a subset of the columns read).
    label_columns: tuple[str, ...] = ()
    #: Columns read when present (e.g. HPDv3's ``choice_dist``, absent from HPDv3++).
    optional: tuple[str, ...] = ()
    #: Whether image cells are paths into an extracted image folder (``--image_root``).
    image_paths: bool = False
    #: ``names -> bool`` for formats whose columns are not fixed names (WebDataset); else ``columns``.
    recognise: Callable[[list[str]], bool] | None = field(default=None, compare=False)
    #: ``names -> columns to read`` for such formats.
    columns_for: Callable[[list[str]], list[str]] | None = field(default=None, compare=False)

    def matches(self, names: list[str]) -> bool:
        if self.recognise is not None:
            return self.recognise(names)
        return set(self.columns) <= set(names)

    def needed(self, names: list[str]) -> list[str]:
        """The columns of a source with ``names`` that this format reads."""
        if self.columns_for is not None:
            return self.columns_for(names)
        return [*self.columns, *(c for c in self.optional if c in names)]


def probability(value, what: str) -> float:
    """``value`` as a probability in [0, 1], or a :class:`LabelError` saying why it is not one."""
    if value is None or isinstance(value, str | bytes | bool):
        raise LabelError(f"{what} {value!r} is not a number in [0, 1]")
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{what} {value!r} is not a number in [0, 1]") from None
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise LabelError(f"{what} {value} is not a number in [0, 1]")
    return p


def vote_share(votes_0, votes_1, what: str) -> float:
    """``votes_0 / (votes_0 + votes_1)``: the share of annotators who preferred image 0."""
    try:
        a, b = float(votes_0), float(votes_1)
    except (TypeError, ValueError):
        raise LabelError(f"{what} ({votes_0!r}, {votes_1!r}) are not vote counts") from None
    if not (math.isfinite(a) and math.isfinite(b) and a >= 0 and b >= 0 and a + b > 0):
        raise LabelError(f"{what} ({votes_0!r}, {votes_1!r}) are not vote counts with at least one vote")
    return a / (a + b)


def winner_first(row: dict) -> None:
    """The label of a source that stores the preferred image first."""
    return None
