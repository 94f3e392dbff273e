"""Choosing a preset's rows (``--rows``): below both the step benchmark (:mod:`.cli`) and the data
preset (:mod:`.loading`), which :mod:`.cli` runs."""

from __future__ import annotations


def select_rows(rows: list, spec: str | None, names: list[str]) -> list:
    """The rows named in ``--rows`` (``spec``, comma-separated; None: all), in the preset's order;
    ``names``: each row's name. ``ValueError`` for a name the preset does not have."""
    if not spec:
        return rows
    wanted = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"--rows: no row named {unknown}; this preset has {names}")
    return [row for row, name in zip(rows, names, strict=True) if name in wanted]
