"""Relabel an existing preference-pair dataset with an automatic scorer (AI feedback, docs/objectives.md#preference-data-ties-labels-ai-feedback).

    python eval/relabel.py --dataset data/pickapic_subset.parquet --scorer pickscore \\
        --output data/pickapic_subset_pickscore.parquet --batch_size 32 --device cuda

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, Sec. 6) trains on Pick-a-Pic pairs relabelled by
PickScore and reports a higher general-preference win rate for SD1.5 than with the human labels. This
script does that relabelling for any scorer: it scores both images of every row, sets ``label_0`` /
``label_1`` from the scores (1 for the higher-scored image, 0.5/0.5 when ``|score_0 − score_1| <=
--tie_margin``), keeps every other column, and adds ``score_0``/``score_1`` (to re-threshold later)
and ``original_label_0``/``original_label_1``. It prints how many human labels the scorer agreed with,
flipped, turned into ties, or resolved from ties.

Input: a Pick-a-Pic-style source — a hub id, a ``.parquet`` file or folder, a ``save_to_disk`` folder,
or ``.jsonl``/``.csv`` — with a ``caption`` column and two image columns: ``jpg_0``/``jpg_1``
(Pick-a-Pic, image bytes), ``image_0``/``image_1``, or ``image_w``/``image_l`` (winner/loser; image
paths relative to the file). Labels in the output refer to the first/second image column.
Beware (docs/objectives.md#preference-data-ties-labels-ai-feedback): a scorer's own biases become the labels.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("relabel")

IMAGE_COLUMN_PAIRS = (("jpg_0", "jpg_1"), ("image_0", "image_1"), ("image_w", "image_l"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset", required=True, help="hub id, .parquet file/folder, save_to_disk folder, .jsonl/.csv"
    )
    p.add_argument("--split", default="train")
    p.add_argument("--scorer", required=True, metavar="NAME[=PATH_OR_ID]")
    p.add_argument("--output", required=True, help="output .parquet file")
    p.add_argument("--caption_column", default="caption")
    p.add_argument(
        "--image_columns", default=None, metavar="A,B", help="the two image columns (default: auto)"
    )
    p.add_argument("--tie_margin", type=float, default=0.0, help="|score_0 − score_1| <= margin is a tie")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per scorer call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_rows", type=int, default=None, help="relabel only the first N rows")
    return p


def read_rows(source: str, split: str = "train", max_rows: int | None = None):
    """The raw rows of a pair dataset (``datasets.Dataset``, images still encoded) and the folder that
    relative image paths are resolved against."""
    from diffusion_dpo.data.pairs import load_rows

    loaded = load_rows(source, split)
    ds = loaded.rows
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"--dataset {source}: {loaded.description} has no rows")
    return ds, Path(loaded.base_dir) if loaded.base_dir else Path.cwd()


def detect_image_columns(columns: list[str], requested: str | None = None) -> tuple[str, str]:
    """The two image columns: ``requested`` ("A,B") or the first pair of ``IMAGE_COLUMN_PAIRS`` present."""
    if requested:
        pair = tuple(c.strip() for c in requested.split(","))
        if len(pair) != 2:
            raise ValueError(f"--image_columns {requested!r}: expected two names, A,B")
        for c in pair:
            if c not in columns:
                raise ValueError(f"--image_columns: column {c!r} not in the dataset; columns are {columns}")
        return pair  # type: ignore[return-value]
    for a, b in IMAGE_COLUMN_PAIRS:
        if a in columns and b in columns:
            return a, b
    raise ValueError(f"no image columns found: expected one of {IMAGE_COLUMN_PAIRS}; columns are {columns}")


def to_pil(value, base_dir: Path, where: str):
    """A stored image (PIL, bytes, ``{"bytes", "path"}`` dict or a path string) → RGB PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if not path.is_file():
            raise ValueError(f"{where}: image file {path} does not exist")
        with Image.open(path) as im:
            return im.convert("RGB")
    raise ValueError(f"{where}: cannot read an image from a {type(value).__name__}")


def labels_from_scores(score_0, score_1, tie_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(label_0, label_1)`` ``[N]``: 1/0 for the higher/lower score, 0.5/0.5 when ``|Δ| <= tie_margin``."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    s0, s1 = np.asarray(score_0, dtype=np.float64), np.asarray(score_1, dtype=np.float64)
    diff = s0 - s1
    label_0 = np.where(np.abs(diff) <= tie_margin, 0.5, (diff > 0).astype(np.float64))
    return label_0, 1.0 - label_0


def count_changes(old_0, old_1, new_0, new_1) -> dict[str, int]:
    """How new labels relate to old ones, per row: ``kept`` (same winner), ``flipped`` (other winner),
    ``to_tie`` (a winner became a tie), ``from_tie`` (a tie got a winner), ``tie_kept``."""
    old = np.sign(np.asarray(old_0, dtype=np.float64) - np.asarray(old_1, dtype=np.float64))
    new = np.sign(np.asarray(new_0, dtype=np.float64) - np.asarray(new_1, dtype=np.float64))
    return {
        "kept": int(np.sum((old != 0) & (new == old))),
        "flipped": int(np.sum((old != 0) & (new == -old))),
        "to_tie": int(np.sum((old != 0) & (new == 0))),
        "from_tie": int(np.sum((old == 0) & (new != 0))),
        "tie_kept": int(np.sum((old == 0) & (new == 0))),
    }


def score_pairs(ds, scorer, caption_column: str, columns: tuple[str, str], base_dir: Path, batch_size: int):
    """Scores ``(score_0 [N], score_1 [N])`` of both images of every row."""
    from tqdm.auto import tqdm

    a, b = columns
    s0, s1 = [], []
    for start in tqdm(range(0, len(ds), batch_size), desc="scoring pairs"):
        batch = ds[start : start + batch_size]
        n = len(batch[a])
        captions = [str(c) for c in batch[caption_column]]
        images = [to_pil(v, base_dir, f"row {start + i}, column {a!r}") for i, v in enumerate(batch[a])]
        images += [to_pil(v, base_dir, f"row {start + i}, column {b!r}") for i, v in enumerate(batch[b])]
        scores = np.asarray(scorer(images, captions + captions).detach().float().cpu(), dtype=np.float64)
        s0.append(scores[:n])
        s1.append(scores[n:])
    return np.concatenate(s0), np.concatenate(s1)


def main(argv: list[str] | None = None) -> dict:
    """Relabel; returns ``{"rows", "changes" (see count_changes, or None), "ties", "output"}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.output.endswith(".parquet"):
        parser.error(f"--output {args.output!r}: expected a .parquet file")
    try:
        ds, base_dir = read_rows(args.dataset, args.split, args.max_rows)
        columns = detect_image_columns(ds.column_names, args.image_columns)
        if args.caption_column not in ds.column_names:
            raise ValueError(
                f"caption column {args.caption_column!r} not in the dataset; columns are {ds.column_names}"
            )
        labels_from_scores([0.0], [0.0], args.tie_margin)  # validates the margin before scoring
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))

    from diffusion_dpo.scorers import load_scorer

    try:
        scorer = load_scorer(args.scorer, device=args.device, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as err:  # unknown name, bad spec, missing weights
        parser.error(f"--scorer {args.scorer!r}: {err}")
    s0, s1 = score_pairs(ds, scorer, args.caption_column, columns, base_dir, args.batch_size)
    new_0, new_1 = labels_from_scores(s0, s1, args.tie_margin)

    if "label_0" in ds.column_names and "label_1" in ds.column_names:
        old_0, old_1 = (
            np.asarray(ds["label_0"], dtype=np.float64),
            np.asarray(ds["label_1"], dtype=np.float64),
        )
    elif columns == ("image_w", "image_l"):
        old_0, old_1 = np.ones(len(ds)), np.zeros(len(ds))  # the first image is the human-chosen winner
    else:
        old_0 = old_1 = None
    changes = count_changes(old_0, old_1, new_0, new_1) if old_0 is not None else None

    drop = [
        c
        for c in ("label_0", "label_1", "original_label_0", "original_label_1", "score_0", "score_1")
        if c in ds.column_names
    ]
    out = ds.remove_columns(drop)
    if old_0 is not None:
        out = out.add_column("original_label_0", old_0.tolist()).add_column(
            "original_label_1", old_1.tolist()
        )
    out = out.add_column("label_0", new_0.tolist()).add_column("label_1", new_1.tolist())
    out = out.add_column("score_0", s0.tolist()).add_column("score_1", s1.tolist())
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Via a temp file and a rename: a run killed while writing leaves no truncated dataset to train on.
    tmp = output.with_name(f".tmp-{output.name}")
    out.to_parquet(str(tmp))
    os.replace(tmp, output)

    ties = int(np.sum(new_0 == 0.5))
    print(
        f"relabelled {len(ds)} pairs with {scorer.name} -> {args.output} ({ties} ties at margin {args.tie_margin})"
    )
    if changes is not None:
        n_old = len(ds) - changes["from_tie"] - changes["tie_kept"]
        print(
            f"vs original labels: kept {changes['kept']}, flipped {changes['flipped']}, "
            f"to tie {changes['to_tie']} (of {n_old} with a winner); "
            f"ties resolved {changes['from_tie']}, ties kept {changes['tie_kept']}"
        )
    return {"rows": len(ds), "changes": changes, "ties": ties, "output": args.output}


if __name__ == "__main__":
    main()
