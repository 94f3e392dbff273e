"""Writing parquet files in the trainer's formats: Pick-a-Pic v2 pairs (:func:`pair_schema`) and any
other table, chunk by chunk (the synthetic world's datasets, mined pairs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def pair_schema(extra: Sequence[tuple] = ()):
    """Pick-a-Pic v2's columns, then ``extra`` ``(name, pyarrow type)`` fields."""
    import pyarrow as pa

    columns = [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary())]
    return pa.schema([*columns, ("label_0", pa.float64()), ("label_1", pa.float64()), *extra])


def write_parquet(path: str | Path, rows: Iterator[dict], schema, chunk: int = 4096) -> Path:
    """Write ``rows`` (dicts) to the parquet file ``path`` with ``schema``, ``chunk`` rows at a time;
    an empty ``rows`` writes an empty file with the columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        buffer: list[dict] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) == chunk:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                count, buffer = count + len(buffer), []
        if buffer or count == 0:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
            count += len(buffer)
    logger.info("wrote %d rows to %s", count, path)
    return path
