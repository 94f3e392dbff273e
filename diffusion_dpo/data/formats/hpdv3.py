"""HPDv3 (Ma et al. 2025, HPSv3, arXiv 2508.03789) and HPDv3++ (arXiv 2606.14657).

Cards read: ``MizzenAI/HPDv3`` (MIT; 1.08M images, 1.17M comparisons; images in ``images.tar.gz.*``,
extracted with ``cat images.tar.gz.* | gunzip | tar -xv``; pair records in ``train.json``/``test.json``
with ``prompt``, ``path1``, ``path2`` and a vote distribution ``choice_dist``, null for the pairs that came
from Discord or HPDv2) and ``Junjun2333/HPDv3-PlusPlus`` (Apache-2.0; ``train_aes``/``train_tf``/
``test_aes``/``test_tf`` JSON files; "each preference pair stores a preferred image (``path1``) and a
non-preferred image (``path2``)"; "every path ... is relative and resolves against the repo root").

So image cells are paths relative to the extracted image folder: the JSON file's own folder by default
(the repo root, where the cards put it), or ``--image_root``. With ``choice_dist`` ``[votes for path1,
votes for path2]`` the label is the vote share of ``path1``; without it (HPDv3++, or a null entry)
``path1`` is the winner, and the loader shuffles positions with a seeded coin so that "image 0 wins"
carries no information.
"""

from __future__ import annotations

from diffusion_dpo.data.formats.base import LabelError, PairFormat, vote_share


def _read(row: dict) -> tuple:
    return row["prompt"], row["path1"], row["path2"]


def _label(row: dict) -> float | None:
    votes = row.get("choice_dist")
    if votes is None:
        return None  # winner first
    if not isinstance(votes, list | tuple) or len(votes) != 2:
        raise LabelError(f"choice_dist {votes!r} is not [votes for path1, votes for path2]")
    return vote_share(votes[0], votes[1], "choice_dist")


FORMAT = PairFormat(
    name="hpdv3",
    summary="HPDv3 / HPDv3++: prompt, path1, path2 (paths into the extracted images), choice_dist if any",
    columns=("prompt", "path1", "path2"),
    optional=("choice_dist",),
    read=_read,
    label=_label,
    label_columns=("choice_dist",),
    image_paths=True,
)
