"""What the scripts that generate through the evaluation suite share (``eval/evaluate.py``,
``data/mine_pairs.py``, ``data/correction_pairs.py``): how ``main`` runs and stops."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable


def run_script(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    run: Callable[[argparse.ArgumentParser, argparse.Namespace], dict],
    faults: tuple[type[Exception], ...],
) -> dict:
    """Parse ``argv`` (bad arguments exit with usage and status 2), log to stderr unless the caller set
    up logging, and return ``run(parser, args)``. A fault found later (one of ``faults``: missing scorer
    weights, a model that does not load, a NaN score) exits with status 1 and one ``error:`` line per
    line of its message, never a stack trace."""
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(parser, args)
    except faults as err:
        parser.exit(1, "".join(f"{parser.prog}: error: {line}\n" for line in str(err).splitlines()))
