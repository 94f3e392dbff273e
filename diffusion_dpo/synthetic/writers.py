"""The world's datasets in the project's formats: Pick-a-Pic v2 pairs (:func:`write_pair_dataset`, and
the imperfect world's), captioned images for pretraining a base model (:func:`write_caption_dataset`)
and unpaired KTO data (:func:`write_unpaired_dataset`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from diffusion_dpo.data.parquet import pair_schema, write_parquet
from diffusion_dpo.synthetic.imperfect import generate_imperfect_pairs
from diffusion_dpo.synthetic.rendering import encode_png, render
from diffusion_dpo.synthetic.world import Spec, caption, corrupt, sample_spec, specs_for


def generate_pairs(
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    heldout: bool | None = False,
    tie_fraction: float = 0.05,
    specs: Sequence[Spec] | None = None,
) -> Iterator[dict]:
    """Pick-a-Pic v2 rows ``caption, jpg_0, jpg_1, label_0, label_1`` (PNG bytes).

    The preferred image follows the caption, the other shows :func:`corrupt` of it; the winner is put
    at position 0 or 1 at random. A ``tie_fraction`` of pairs are ties (two faithful renders,
    ``label_0 = 0.5``) so that tie handling is exercised. Training pairs (``heldout=False``) show
    training combinations only, losers included. ``specs`` (overrides ``heldout``): draw captions and
    losers from these combinations only (e.g. :func:`validation_split`'s).
    """
    rng = np.random.default_rng(seed)
    within = set(specs) if specs is not None else (set(specs_for(False)) if heldout is False else None)
    specs = tuple(specs) if specs is not None else specs_for(heldout)
    for _ in range(n_pairs):
        spec = sample_spec(rng, specs)
        if rng.random() < tie_fraction:
            first, second, label_0 = render(spec, rng, resolution), render(spec, rng, resolution), 0.5
        else:
            winner, loser = render(spec, rng, resolution), render(corrupt(spec, rng, within), rng, resolution)
            label_0 = float(rng.random() < 0.5)
            first, second = (winner, loser) if label_0 == 1.0 else (loser, winner)
        yield {
            "caption": caption(spec),
            "jpg_0": encode_png(first),
            "jpg_1": encode_png(second),
            "label_0": label_0,
            "label_1": 1.0 - label_0,
        }


def generate_captioned_images(
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    caption_noise: float = 0.0,
    heldout: bool | None = False,
    specs: Sequence[Spec] | None = None,
) -> Iterator[dict]:
    """Rows ``caption, image`` (PNG bytes) for pretraining a base model. With probability
    ``caption_noise`` the caption is replaced by another combination's caption (from the same split),
    so the base model learns to follow captions only partly and preference tuning has room to help.
    ``specs`` (overrides ``heldout``): the combinations to draw from."""
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
    rng = np.random.default_rng(seed)
    specs = tuple(specs) if specs is not None else specs_for(heldout)
    for _ in range(n_images):
        spec = sample_spec(rng, specs)
        image = render(spec, rng, resolution)
        shown = spec
        if rng.random() < caption_noise:
            shown = sample_spec(rng, [s for s in specs if s != spec])
        yield {"caption": caption(shown), "image": encode_png(image)}


def generate_unpaired(
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    desirable_fraction: float = 0.5,
    heldout: bool | None = False,
) -> Iterator[dict]:
    """Diffusion-KTO rows ``caption, image, label``: desirable images follow the caption
    (``label=True``), undesirable ones show :func:`corrupt` of it (``label=False``); with
    ``heldout=False`` a training combination, as in :func:`generate_pairs`."""
    rng = np.random.default_rng(seed)
    specs = specs_for(heldout)
    within = set(specs) if heldout is False else None
    for _ in range(n_images):
        spec = sample_spec(rng, specs)
        desirable = bool(rng.random() < desirable_fraction)
        image = render(spec if desirable else corrupt(spec, rng, within), rng, resolution)
        yield {"caption": caption(spec), "image": encode_png(image), "label": desirable}


def write_pair_dataset(
    path: str | Path,
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    heldout: bool | None = False,
    tie_fraction: float = 0.05,
    specs: Sequence[Spec] | None = None,
) -> Path:
    """Write :func:`generate_pairs` to the parquet file ``path`` (Pick-a-Pic v2 columns)."""
    rows = generate_pairs(n_pairs, seed, resolution, heldout, tie_fraction, specs)
    return write_parquet(path, rows, pair_schema())


def write_imperfect_pair_dataset(
    path: str | Path,
    n_pairs: int,
    seed: int = 0,
    resolution: int = 32,
    specs: Sequence[Spec] | None = None,
    temperature: float | None = None,
) -> Path:
    """Write :func:`generate_imperfect_pairs` to the parquet file ``path`` (Pick-a-Pic v2 columns, plus
    ``faithfulness_0/1`` and ``errors_0/1``)."""
    import pyarrow as pa

    extra = [(f"faithfulness_{i}", pa.float64()) for i in (0, 1)] + [
        (f"errors_{i}", pa.int64()) for i in (0, 1)
    ]
    rows = generate_imperfect_pairs(n_pairs, seed, resolution, specs, temperature)
    return write_parquet(path, rows, pair_schema(extra))


def write_caption_dataset(
    path: str | Path,
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    caption_noise: float = 0.0,
    heldout: bool | None = False,
    specs: Sequence[Spec] | None = None,
) -> Path:
    """Write :func:`generate_captioned_images` to the parquet file ``path`` (columns caption, image)."""
    import pyarrow as pa

    schema = pa.schema([("caption", pa.string()), ("image", pa.binary())])
    rows = generate_captioned_images(n_images, seed, resolution, caption_noise, heldout, specs)
    return write_parquet(path, rows, schema)


def write_unpaired_dataset(
    path: str | Path,
    n_images: int,
    seed: int = 0,
    resolution: int = 32,
    desirable_fraction: float = 0.5,
    heldout: bool | None = False,
) -> Path:
    """Write :func:`generate_unpaired` to the parquet file ``path`` (columns caption, image, label)."""
    import pyarrow as pa

    schema = pa.schema([("caption", pa.string()), ("image", pa.binary()), ("label", pa.bool_())])
    rows = generate_unpaired(n_images, seed, resolution, desirable_fraction, heldout)
    return write_parquet(path, rows, schema)
