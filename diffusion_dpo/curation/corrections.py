"""Correction pairs (``data/correction_pairs.py``): a given image of a caption preferred over the model's
own sample of it (SPIN-Diffusion's pairs), the given image at ``jpg_0`` or ``jpg_1`` by a seeded coin."""

from __future__ import annotations

from diffusion_dpo.curation import mining
from diffusion_dpo.data.pairs import load_rows, resolve_image_path
from diffusion_dpo.data.transforms import decode_image, image_bytes


def read_captioned_rows(
    dataset: str, split: str, caption_column: str, image_column: str, max_rows: int | None = None
):
    """``(rows, captions, base_dir, description)`` of a ``caption, image`` dataset: the raw rows (images
    still encoded; the first ``max_rows``), every caption stripped, all checked. ValueError or
    FileNotFoundError naming the source and the row."""
    source = load_rows(dataset, split)
    names = list(source.rows.column_names)
    missing = [c for c in (caption_column, image_column) if c not in names]
    if missing:
        raise ValueError(
            f"missing columns {missing} in {source.description}; found columns {sorted(names)} "
            "(name them with --caption_column / --image_column)"
        )
    rows = source.rows.select_columns([caption_column, image_column])
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        raise ValueError(f"{source.description} has no rows")
    captions = []
    for i, row in enumerate(rows):
        text = row[caption_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"row {i} of {source.description}: caption ({caption_column!r}) is empty or not text: {text!r}"
            )
        captions.append(text.strip())
        # Decoded now, so a broken image stops the run before any sampling, naming its row.
        decode_image(
            resolve_image_path(row[image_column], source.base_dir),
            where=f"row {i} of {source.description}, column {image_column!r}",
        )
    return rows, captions, source.base_dir, source.description


def correction_rows(rows, captions, base_dir, image_column, unique, seeds, paths, seed):
    """Pick-a-Pic rows, one per (row, sample), given image first or second by a seeded coin."""
    for i, row in enumerate(rows):
        given = image_bytes(resolve_image_path(row[image_column], base_dir))  # as stored, not re-encoded
        for k, sample_seed in enumerate(seeds):
            sample = paths[unique[captions[i]]][k].read_bytes()
            first = mining.chosen_first(seed, i, k)
            yield {
                "caption": captions[i],
                "jpg_0": given if first else sample,
                "jpg_1": sample if first else given,
                "label_0": 1.0 if first else 0.0,
                "label_1": 0.0 if first else 1.0,
                "seed_0": None if first else sample_seed,
                "seed_1": sample_seed if first else None,
                "row_index": i,
            }
