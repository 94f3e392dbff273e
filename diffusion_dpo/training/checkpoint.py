"""Resumable checkpoints: ``output_dir/checkpoint-N`` folders, written atomically and rotated."""

from __future__ import annotations

import json
import logging
import os
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    # A killed process loses nothing that reached the page cache, but a lost machine (power, kernel)
    # can: flush the files and their folder before the rename makes the checkpoint visible.
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, limit: int | None) -> Path:
    """Save model/optimizer/scheduler/RNG state and our ``state`` dict to ``checkpoint-{step}``.

    Every process writes its part into ``checkpoint-{step}.tmp``; the main process then writes
    ``training_state.json`` last, flushes everything to disk and renames the folder. ``latest``
    only considers ``checkpoint-N`` folders holding ``training_state.json``, so a process killed at
    any point of a save (even between removing an older ``checkpoint-{step}`` and the rename) leaves
    the newest complete checkpoint as ``latest``. Older checkpoints beyond ``limit`` are removed
    only after the new one is in place. Every process must call this (it synchronises them).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's part is written
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): keep it until replaced
            stale = root / f"checkpoint-{step}.old"
            if stale.exists():
                shutil.rmtree(stale)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale)
        else:
            tmp.rename(final)
        _fsync(root)  # the rename itself
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
