"""Shortcut audit of a pair dataset: what, besides content, separates the chosen images from the rejected.

DPO pushes the model towards whatever distinguishes winners from losers. When that is the file format,
the JPEG quality, the size or the sharpness rather than what the annotators judged, the model learns
compression artefacts or resolution instead of the preference. This module measures such traits per
image and asks, for each one, how well it ALONE predicts the winner:

- numeric traits (width, height, aspect ratio, estimated JPEG quality, encoded bytes per pixel, mean
  brightness, mean saturation, sharpness): the accuracy over non-tied pairs of the rule "the image with
  the higher value wins", or "the lower", whichever is better; a pair whose two values are equal counts
  0.5 (the rule cannot decide it, as a coin);
- categorical traits (file format, ``WxH`` size): the best rule "the image whose value is X wins" (or
  "loses"), a pair where both or neither have X counting 0.5;
- position: the rule "image 0 wins" (or 1) over Pick-a-Pic ``label_0``. After loading, pairs are put
  winner first, so position is no shortcut for the trainer; a strong bias says the annotation tool or
  the annotators favoured one side, which makes the labels less trustworthy;
- caption length (words): both images share the caption, so it cannot pick the winner. What it can
  predict is which pairs are ties (dropping ties then shifts the captions trained on) and the winning
  position (a labelling artefact); each is the AUC (Mann-Whitney) of the word count, best direction.

Each accuracy comes with a 95% Wilson interval (for the caption AUCs: Hanley and McNeil's), and a trait
is flagged when the LOWER end of it exceeds ``threshold`` (default 0.6): a trait must predict the winner
clearly better than chance, and on enough pairs, so noise in a few hundred clean pairs is not flagged.
The rule's direction is chosen on the same pairs, which can only raise the accuracy; with the interval's
lower end as the test, that choice does not flag noise either.

Also counted: ties (share, interval), identical pairs (both images the same bytes or pixels), exact
duplicate images across the dataset (same bytes; same pixels), near duplicates (a 64-bit difference hash
within :data:`~.report.NEAR_DISTANCE` bits), pairs of the same two images repeated (and with opposite winners),
bad labels, and images that cannot be read (counted and named, never a crash).

Two depths. ``full=False`` reads the file header only (size, format, JPEG tables) and the byte count:
what the trainer runs at start-up (:func:`startup_audit`) on a bounded sample. ``full=True`` decodes
the pixels too: ``python data/audit_pairs.py``.
"""

from __future__ import annotations

import logging
import time

from diffusion_dpo.curation.report import summarize
from diffusion_dpo.curation.rules import DEFAULT_THRESHOLD
from diffusion_dpo.curation.traits import measure_pair
from diffusion_dpo.data.pairs import (
    ORDERED_COLUMNS,
    PICKAPIC_COLUMNS,
    column_names,
    detect_pair_schema,
    load_rows,
    resolve_image_path,
    sample_rows,
)

logger = logging.getLogger(__name__)

#: The trainer's start-up audit: at most this many pairs, and about this many seconds of reading.
STARTUP_PAIRS = 256
STARTUP_SECONDS = 5.0

# ----------------------------------------------------------------------------------------------
# Reading pairs


class PairReader:
    """The raw pairs of a source, as dicts ``{"row", "caption", "image_0", "image_1", "label_0"}``:
    Pick-a-Pic rows as stored (ties and bad labels included, for the audit to count), ordered pairs
    with the winner as image 0 and ``label_0`` 1. Loads through :func:`~diffusion_dpo.data.pairs.load_rows`,
    so a wrong path or a missing column is the loader's error, naming the source.

    ``max_pairs``: a seeded random subset (:func:`~diffusion_dpo.data.pairs.sample_rows`), or with
    ``streaming`` the first ``max_pairs`` rows; None: all.
    """

    def __init__(self, dataset_name, split: str = "train", *, max_pairs: int | None = None, seed: int = 0,
                 streaming: bool = False, cache_dir: str | None = None, dataset_format: str = "auto",
                 image_root: str | None = None):  # fmt: skip
        source = load_rows(dataset_name, split, streaming=streaming, cache_dir=cache_dir)
        self.description = source.description
        self.base_dir = image_root or source.base_dir
        names = column_names(source)
        self.converter = None
        try:
            self.schema = detect_pair_schema(names, source.description)
            needed = list(ORDERED_COLUMNS if self.schema == "ordered" else PICKAPIC_COLUMNS)
        except ValueError:  # the other formats (diffusion_dpo/data/formats), in their positional form
            from diffusion_dpo.data.pairs import PairConverter, resolve_format

            fmt = resolve_format(names, source.description, dataset_format)  # or the loader's error
            self.schema, self.converter = fmt.name, PairConverter(fmt, self.base_dir, seed)
            needed = fmt.needed(names)
        rows = source.rows.select_columns(needed)
        self.streaming = streaming
        if streaming:
            self.rows, self.positions = (rows.take(max_pairs) if max_pairs else rows), None
        else:
            self.positions = sample_rows(len(rows), max_pairs, seed)
            self.rows = rows

    def __len__(self) -> int | None:
        return None if self.positions is None else len(self.positions)

    def _pair(self, row: int, values: dict) -> dict:
        if self.converter is not None:
            # the audit's label_0 is the majority (0, 0.5 or 1); p0, the vote share, is for label quality
            pair = self.converter.positional(values)
            p0 = pair["label_0"]
            majority = None if p0 is None else (1.0 if p0 > 0.5 else 0.0 if p0 < 0.5 else 0.5)
            return {**pair, "row": row, "label_0": majority, "p0": p0}
        if self.schema == "ordered":
            first, second, label = values["image_w"], values["image_l"], 1.0
        else:
            first, second, label = values["jpg_0"], values["jpg_1"], values["label_0"]
        return {
            "row": row, "caption": values["caption"], "label_0": label,
            "image_0": resolve_image_path(first, self.base_dir), "image_1": resolve_image_path(second, self.base_dir),
        }  # fmt: skip

    def __iter__(self):
        if self.positions is None:
            for row, values in enumerate(self.rows):
                yield self._pair(row, values)
            return
        chosen = self.rows.select(self.positions) if len(self.positions) < len(self.rows) else self.rows
        for row, values in zip(self.positions.tolist(), chosen):
            yield self._pair(row, values)

    def get(self, rows) -> dict[int, dict]:
        """The pairs at these source ``rows`` (a stream is read again up to the last one)."""
        wanted = set(rows)
        if self.positions is not None:
            return {row: self._pair(row, self.rows[int(row)]) for row in sorted(wanted)}
        found = {}
        for pair in self:
            if pair["row"] in wanted:
                found[pair["row"]] = pair
                if len(found) == len(wanted):
                    break
        return found


def audit_dataset(dataset_name, split: str = "train", *, max_pairs: int | None = 2000, seed: int = 0,
                  threshold: float = DEFAULT_THRESHOLD, full: bool = True, streaming: bool = False,
                  cache_dir: str | None = None, **reader_options) -> tuple[dict, list[dict], PairReader]:  # fmt: skip
    """Read, measure and summarise a pair dataset: (report, per-pair records, the reader).
    ``reader_options``: :class:`PairReader`'s ``dataset_format`` and ``image_root``."""
    reader = PairReader(
        dataset_name, split, max_pairs=max_pairs, seed=seed, streaming=streaming, cache_dir=cache_dir,
        **reader_options,
    )  # fmt: skip
    records = []
    for i, pair in enumerate(reader, 1):
        records.append(measure_pair(pair, full=full))
        if i % 1000 == 0:
            logger.info("measured %d pairs of %s", i, reader.description)
    report = summarize(records, threshold=threshold, positional=reader.schema == "pickapic")
    report = {"source": reader.description, "schema": reader.schema, "split": split, **report}
    return report, records, reader


# ----------------------------------------------------------------------------------------------
# The trainer's start-up check


def startup_audit(rows, stats, *, dataset_name, max_pairs: int = STARTUP_PAIRS,
                  threshold: float = DEFAULT_THRESHOLD, time_budget_s: float = STARTUP_SECONDS) -> list[str]:  # fmt: skip
    """The cheap audit the trainer runs on its loaded pairs; logs a warning naming each flagged trait.

    ``rows``: what :func:`~diffusion_dpo.data.pairs.load_pair_dataset` returned (winner first), ``stats``
    its :class:`~diffusion_dpo.data.pairs.PairStats`. Headers only (size, format, JPEG quality, bytes
    per pixel) and identical pairs, on at most ``max_pairs`` pairs drawn at random, reading for about
    ``time_budget_s`` at most; ties and position bias from the loader's counts over the whole dataset.
    A stream is left alone (reading it here would consume it), as is anything that is not pairs.
    Returns the flagged names (plus ``identical_pairs`` when there are some); never raises.
    """
    try:
        return _startup_audit(rows, stats, dataset_name, max_pairs, threshold, time_budget_s)
    except Exception as error:  # advice only: an audit that fails must not stop a run
        logger.warning("start-up shortcut audit skipped (%s: %s)", type(error).__name__, error)
        return []


def _startup_audit(rows, stats, dataset_name, max_pairs, threshold, time_budget_s) -> list[str]:
    import datasets

    from diffusion_dpo.data.pairs import PairStats

    if not isinstance(stats, PairStats):  # unpaired (KTO) or caption/image data
        return []
    if not isinstance(rows, datasets.Dataset):
        logger.info(
            "start-up shortcut audit skipped for a streamed dataset (it would consume the stream); run "
            "`python data/audit_pairs.py --dataset %s --streaming --max_pairs 2000`",
            dataset_name,
        )
        return []
    started = time.monotonic()
    positions = sample_rows(len(rows), max_pairs, seed=0).tolist()
    records = []
    for start in range(0, len(positions), 32):
        batch = rows[positions[start : start + 32]]  # normalised: image_w is the winner
        for j, row in enumerate(positions[start : start + 32]):
            if batch["bad"][j] is None:
                pair = {"row": row, "caption": batch["caption"][j], "image_0": batch["image_w"][j],
                        "image_1": batch["image_l"][j], "label_0": 1.0}  # fmt: skip
                records.append(measure_pair(pair, full=False))
        if time.monotonic() - started > time_budget_s:
            break
    pickapic = "label_0" in rows.column_names  # else ordered pairs: no labels, no position
    decided = stats.seen - stats.ties - stats.bad_labels
    report = summarize(
        records, threshold=threshold, positional=False,
        position_counts=(decided - stats.swapped, decided) if pickapic else None,
        tie_counts=(stats.ties, stats.seen - stats.bad_labels) if pickapic else None,
    )  # fmt: skip
    flagged = [t for t in report["traits"] if t["flag"]]
    identical = report["identical_pairs"]["count"]
    seconds = time.monotonic() - started
    if not flagged and not identical:
        logger.info(
            "start-up shortcut audit of %d pairs (%.1f s): no size, format, JPEG quality, bytes per pixel or "
            "position rule predicts the winner (lower bound above %.2f)", len(records), seconds, threshold,
        )  # fmt: skip
        return []
    lines = [
        f"  - {t['trait']}: '{t['rule']}' alone picks the winner in {t['accuracy']:.0%} of pairs "
        f"(95% [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}]); {t['explanation']}"
        for t in flagged
    ]
    if identical:
        lines.append(
            f"  - identical_pairs: {identical} pairs show the same picture twice (rows {report['identical_pairs']['rows']})"
        )
    logger.warning(
        "start-up shortcut audit of %d pairs of %s: something besides content separates chosen from rejected, "
        "and the model may learn it instead of the preference:\n%s\nRun `python data/audit_pairs.py --dataset %s` "
        "for the full audit (pixels, duplicates, example pairs); --no_audit_pairs turns this check off.",
        len(records), dataset_name, "\n".join(lines), dataset_name,
    )  # fmt: skip
    return [t["trait"] for t in flagged] + (["identical_pairs"] if identical else [])
