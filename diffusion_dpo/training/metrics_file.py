"""``metrics.jsonl``: one JSON row per optimizer step, written by the main process, cut back to a
checkpoint's step when a run resumes from it."""

from __future__ import annotations

import json
import math
from pathlib import Path


def append_metrics(path: Path, row: dict) -> None:
    # NaN/Inf are not JSON: a non-finite value is written as null (the log says which step it was)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with path.open("a") as f:
        f.write(json.dumps(clean) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    # After a resume, rows logged past the checkpoint by the interrupted run would be duplicated.
    if path.is_file():
        rows = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(r + "\n" for r in rows))
