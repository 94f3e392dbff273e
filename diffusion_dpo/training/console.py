"""What a person sees while a run starts and runs: log lines from the first one, a progress bar with
only the numbers that exist."""

from __future__ import annotations

import logging
import math

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """INFO lines on stderr, set up before anything else runs: the embedded default builds its base
    for over a minute before training, and its log lines say so (before this, Python's fallback
    handler showed warnings only). A no-op when the program (or a test) configured logging already."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    # accelerate logs four lines per checkpoint (weights, optimizer, scheduler, RNG); ours logs one
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def progress_fields(row: dict) -> dict[str, str]:
    """The progress bar's fields of a metrics row: the loss, and the training-pair accuracy where the
    objective has one (DPO, MaPO; not SFT); a value that does not exist (yet) or is not finite is left
    out rather than shown as ``nan``."""
    fields = {}
    if _finite(row.get("loss")):
        fields["loss"] = f"{row['loss']:.4f}"
    if _finite(row.get("rewards/accuracies")):
        fields["acc"] = f"{row['rewards/accuracies']:.2f}"
    return fields
