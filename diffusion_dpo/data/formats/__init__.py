"""Pair formats: one small module per published schema, each turning a row into the loader's
positional form ``(caption, image_0, image_1, p0)`` with ``p0 = P(image 0 preferred)``.

=========================  ===================================================================
``pickapic``               Pick-a-Pic v2 and mirrors (:mod:`.pickapic`)
``ordered``                ``caption, image_w, image_l`` (:mod:`.ordered`)
``columns``                ``caption, image_0, image_1, label_0`` (:mod:`.columns`)
``hpdv3``                  HPDv3 / HPDv3++ (:mod:`.hpdv3`)
``imagereward``            ImageRewardDB ``*_pair`` (:mod:`.imagereward`)
``open_image_preferences`` open-image-preferences binarized; ``..._votes`` with vote counts
``webdataset``             tar shards of two images + a JSON per sample (:mod:`.webdataset`)
=========================  ===================================================================

A source's format is recognised from its columns (``--dataset_format auto``) or named. Winner-first
formats (ordered, HPDv3++, ImageRewardDB, binarized) have their positions shuffled by :func:`position_coin`,
a seeded hash of the row's content, so that the same row gets the same positions in every run, on any
number of processes and after a resume, and "image 0 wins" says nothing. docs/data.md has the table of
datasets, what each needs locally and its licence.
"""

from __future__ import annotations

import hashlib
import os

from diffusion_dpo.data.formats import columns, hpdv3, imagereward, open_image_preferences, ordered, pickapic
from diffusion_dpo.data.formats import webdataset as webdataset_format
from diffusion_dpo.data.formats.base import LabelError, PairFormat

#: In the order they are tried when recognising a source (most specific first).
FORMATS: dict[str, PairFormat] = {
    f.name: f
    for f in (
        ordered.FORMAT,
        pickapic.FORMAT,
        columns.FORMAT,
        hpdv3.FORMAT,
        imagereward.FORMAT,
        open_image_preferences.VOTES,
        open_image_preferences.BINARIZED,
        webdataset_format.FORMAT,
    )
}
DATASET_FORMATS = ("auto", *FORMATS)

__all__ = ["DATASET_FORMATS", "FORMATS", "LabelError", "PairFormat", "position_coin", "resolve_format"]


def _supported() -> str:
    return "; ".join(f"{f.name} ({f.summary})" for f in FORMATS.values())


def resolve_format(names: list[str], description: str, requested: str = "auto") -> PairFormat:
    """The format of a source with columns ``names``: ``requested``, checked, or the first that fits.

    Raises ``ValueError`` naming the missing columns (against the closest format), the columns found,
    the source and every supported format.
    """
    if requested not in DATASET_FORMATS:
        raise ValueError(f"--dataset_format {requested!r} is not one of {list(DATASET_FORMATS)}")
    candidates = list(FORMATS.values()) if requested == "auto" else [FORMATS[requested]]
    for fmt in candidates:
        if fmt.matches(names):
            return fmt
    closest = max(candidates, key=lambda f: len(set(f.columns) & set(names)) / len(f.columns))
    missing = [c for c in closest.columns if c not in names]
    what = f"the {closest.name} format" if requested == "auto" else f"--dataset_format {requested}"
    raise ValueError(
        f"missing columns {missing} for {what}; found columns {sorted(names)} in {description}. "
        f"Supported pair formats: {_supported()}"
    )


def _identity(value) -> bytes:
    # What names an image cell cheaply: a path as written, or the length and ends of its bytes.
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, str | os.PathLike):
        return os.fspath(value).encode()
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return len(data).to_bytes(8, "little") + data[:4096] + data[-4096:]
    return repr(value).encode()


def position_coin(seed: int, caption, image_a, image_b) -> bool:
    """A seeded fair coin of a pair's content: True puts ``image_b`` first. Symmetric in nothing: the
    same stored pair always gets the same answer, whatever the row's position, process or epoch."""
    digest = hashlib.blake2b(digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    for part in (str(caption).encode(), _identity(image_a), _identity(image_b)):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.digest()[0] & 1 == 1
