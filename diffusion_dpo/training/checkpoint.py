"""Resumable checkpoints: ``output_dir/checkpoint-N`` folders, written atomically and rotated."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest first (half-written ``.tmp`` folders are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` → newest checkpoint in ``output_dir`` (None if there is none); a path → that path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", output_dir
            )
            return None
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE}); "
            f"available: {[p.name for p in list_checkpoints(output_dir)] or 'none'}"
        )
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, limit: int | None) -> Path:
    """Save model/optimizer/scheduler/RNG state and our ``state`` dict to ``checkpoint-{step}``.

    Written to ``checkpoint-{step}.tmp`` first and renamed when complete, so a crash mid-save never
    leaves a checkpoint that ``latest`` would pick up. Older checkpoints beyond ``limit`` are removed.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:
            for old in list_checkpoints(root)[:-limit]:
                logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, limit)
                shutil.rmtree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns our ``state`` dict."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())
