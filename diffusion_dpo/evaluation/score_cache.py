"""Per-image scores cached on disk, so an interrupted evaluation never scores an image twice.

Scoring thousands of images with PickScore or HPS is not free, and a run killed half-way keeps every
score it computed. There is one append-only JSONL file per scorer *identity* (:func:`scorer_identity`:
its spec, dtype, the sizes and modification times of its local weight files, and the code that
computes the score: a hash of the scorer sources and the versions of the libraries they call, so a fix
or an upgrade never mixes old and new scores in one comparison), with one line per image:
``{"key": KEY, "score": 21.53}``. ``KEY``
(:func:`score_key`) hashes the image file's bytes and its prompt, so a regenerated image, or the same
image under another prompt (the safety checker's black images), gets a new key.

A kill can only cut the last line short. Such a line has no newline (or is not JSON) and is ignored on
reading, so a half-written record is never read back; the next append starts on a fresh line.
Non-finite scores are never cached: they are reported, and scored again on a rerun.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Libraries whose version can change a score (model code, preprocessing, resizing).
SCORING_LIBRARIES = ("torch", "torchvision", "transformers", "open_clip_torch", "pillow")
#: Modules outside ``diffusion_dpo.scorers`` that compute a scorer's score.
_WORLD = (
    "diffusion_dpo.synthetic.world",
    "diffusion_dpo.synthetic.rendering",
    "diffusion_dpo.synthetic.faithfulness",
)
_EXTRA_CODE = {name: _WORLD for name in ("shapes", "shapes_color_area")}


def _code_hash(name: str) -> str:
    # Every scorer module (they share base.py and clip_score.py), and what a scorer calls elsewhere.
    import diffusion_dpo.scorers as package

    files = sorted(Path(package.__file__).parent.glob("*.py"))
    files += [Path(importlib.import_module(module).__file__) for module in _EXTRA_CODE.get(name, ())]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def scorer_identity(spec: str, dtype: str) -> dict:
    """A JSON-able description of what a scorer's scores depend on.

    The device is left out: CPU and GPU scores of one scorer differ in the last digits only, as do
    scores of the same image in batches of different sizes. Hub weights are identified by name only,
    as models are (see ``generate.model_identity``).
    """
    from diffusion_dpo.scorers import parse_spec, required_files

    files = [path for need in required_files(spec) for path in need.local_files()]
    stamps = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {
        "spec": spec,
        "dtype": dtype,
        "files": stamps,
        "code": _code_hash(parse_spec(spec)[0]),
        "libraries": {name: _version(name) for name in SCORING_LIBRARIES},
    }


def score_key(image_path: str | Path, prompt: str) -> str:
    """sha256 over the image file's bytes and its prompt: the cache key of one score."""
    digest = hashlib.sha256(Path(image_path).read_bytes())
    digest.update(b"\0" + prompt.encode("utf-8"))
    return digest.hexdigest()


class ScoreCache:
    """Scores of one scorer identity, read from and appended to one JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.scores: dict[str, float] = {}
        self._torn_tail = False
        if self.path.exists():
            self._read()

    @classmethod
    def for_scorer(cls, folder: str | Path, spec: str, dtype: str) -> ScoreCache:
        """The cache of scorer ``spec`` run in ``dtype``, under ``folder``."""
        from diffusion_dpo.scorers import parse_spec

        identity = json.dumps(scorer_identity(spec, dtype), sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return cls(Path(folder) / f"{parse_spec(spec)[0]}-{digest}.jsonl")

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        tail = lines.pop()  # empty after a complete write; a torn record after a kill
        self._torn_tail = bool(tail)
        unreadable = int(self._torn_tail)
        for line in lines:
            try:
                record = json.loads(line)
                key, score = record["key"], float(record["score"])
            except (ValueError, KeyError, TypeError):  # a torn or garbled line (a crash, bit-rot)
                unreadable += 1
                continue
            if isinstance(key, str) and math.isfinite(score):
                self.scores[key] = score
            else:
                unreadable += 1
        if unreadable:
            logger.warning("%s: ignored %d unreadable score records", self.path, unreadable)

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, scores: dict[str, float]) -> None:
        """Append the finite ``scores`` (``{key: score}``) in one write, flushed to disk."""
        finite = {k: float(v) for k, v in scores.items() if math.isfinite(v)}
        if not finite:
            return
        text = "".join(json.dumps({"key": k, "score": v}) + "\n" for k, v in finite.items())
        if self._torn_tail:
            text = "\n" + text  # end the torn line, so it cannot swallow the first new record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self._torn_tail = False
        self.scores.update(finite)


def score_files(
    scorer, paths: list[Path], prompts: list[str], keys: list[str], cache: ScoreCache, *, chunk_size: int = 64
) -> tuple[np.ndarray, int]:
    """Scores ``[N]`` of image files with their prompts, from ``cache`` or from ``scorer``.

    Images whose key is not cached are opened ``chunk_size`` at a time, scored, and their scores
    appended to ``cache`` after each chunk, so a crash loses at most one chunk. ``scorer`` may be
    None when every key is cached. Non-finite scores are returned (as NaN/inf) but not cached.

    Returns:
        ``(scores, n_scored)``: float64 ``[N]`` and how many images were scored now.
    """
    from PIL import Image

    todo: dict[str, int] = {}  # key -> first index; an image repeated under the same prompt is scored once
    for i, key in enumerate(keys):
        if key not in cache and key not in todo:
            todo[key] = i
    if todo and scorer is None:
        raise ValueError(f"{len(todo)} images have no cached score and no scorer was given")
    fresh: dict[str, float] = {}
    jobs = list(todo.items())
    for start in range(0, len(jobs), chunk_size):
        chunk = jobs[start : start + chunk_size]
        images = []
        for _, i in chunk:
            with Image.open(paths[i]) as im:
                images.append(im.convert("RGB"))
        values = scorer(images, [prompts[i] for _, i in chunk])
        values = np.asarray(values.detach().float().cpu(), dtype=np.float64).reshape(-1)
        if values.shape[0] != len(chunk):
            raise RuntimeError(f"scorer returned {values.shape[0]} scores for {len(chunk)} images")
        got = {key: float(v) for (key, _), v in zip(chunk, values)}
        cache.add(got)
        fresh.update(got)
    scores = np.array([fresh[k] if k in fresh else cache.scores[k] for k in keys], dtype=np.float64)
    return scores, len(jobs)


def scorer_if_needed(spec: str, needed: bool, *, device, dtype, batch_size: int, error: type = ValueError):
    """The scorer of ``spec``, loaded only when ``needed`` (some score is missing from its cache), else
    None. A load failure (missing weights, a corrupt checkpoint) is raised as ``error`` naming
    ``--scorer spec``, on one line."""
    if not needed:
        return None
    from diffusion_dpo.scorers import load_scorer

    try:
        return load_scorer(spec, device=device, dtype=dtype, batch_size=batch_size)
    except (ValueError, OSError) as err:  # incl. MissingWeightsError
        raise error(f"--scorer {spec!r}: {' '.join(str(err).split())}") from err
