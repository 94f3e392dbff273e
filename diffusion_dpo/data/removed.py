"""Hub dataset ids known to be gone, and what to use instead.

Pick-a-Pic v1 and v2 were taken down from the Hugging Face Hub in 2025 (yuvalkirstain/PickScore#36,
SalesforceAIResearch/DiffusionDPO#22; RichHF-18K's images went with v1, youweiliang/RichHF#1). Loading
one of these ids would cost a user a hub-client stack trace after minutes of model loading; instead,
:func:`check_not_removed` is called on every dataset id before anything loads (the trainer's config
check, :func:`diffusion_dpo.data.pairs.load_rows`) and fails with one line naming the alternatives.
docs/data.md lists the live datasets with their formats, sizes and licences.
"""

from __future__ import annotations

import os

#: Live Pick-a-Pic v2 copies and the 2025-26 datasets that replace it (docs/data.md).
PICKAPIC_ALTERNATIVES = (
    "liuhuohuo2/pick-a-pic-v2 (community mirror, same columns)",
    "sayakpaul/pickapic_v2_webdataset (WebDataset shards of it)",
    "MizzenAI/HPDv3 (1.17M pairs, MIT; --dataset_format hpdv3 --image_root)",
    "data-is-better-together/open-image-preferences-v1-binarized (Apache-2.0)",
)

#: id -> (what happened, alternatives).
REMOVED_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "yuvalkirstain/pickapic_v2": (
        "Pick-a-Pic v2 was removed from the Hugging Face Hub in 2025 (yuvalkirstain/PickScore#36)",
        PICKAPIC_ALTERNATIVES,
    ),
    "yuvalkirstain/pickapic_v1": (
        "Pick-a-Pic v1 was removed from the Hugging Face Hub in 2025 (youweiliang/RichHF#1)",
        PICKAPIC_ALTERNATIVES,
    ),
}


class RemovedDatasetError(ValueError):
    """A dataset id that is known to be gone from the hub; the message is one line."""


def removed_reason(name) -> str | None:
    """The one-line error for a known-removed hub id (case-insensitive, ``datasets/`` prefix allowed),
    or None for any other name."""
    if not isinstance(name, str) or os.path.exists(os.path.expanduser(name)):
        return None  # a local copy saved under the old name is the user's, and loads
    key = name.strip().removeprefix("datasets/").lower()
    for removed, (what, alternatives) in REMOVED_DATASETS.items():
        if key == removed.lower():
            return f"{name!r} is gone: {what}; use one of: {'; '.join(alternatives)} (see docs/data.md)"
    return None


def check_not_removed(name, *, flag: str | None = None) -> None:
    """Raise :class:`RemovedDatasetError` (one line, naming ``flag`` when given) for a removed hub id."""
    reason = removed_reason(name)
    if reason is not None:
        raise RemovedDatasetError(f"{flag}: {reason}" if flag else reason)
