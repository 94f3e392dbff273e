"""Prompt sets for evaluation: a text file, a table, or a hub dataset.

Sources :func:`load_prompts` understands:

- ``prompts.txt`` — one prompt per line (blank lines skipped);
- ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` files — a prompt column (``prompt``, ``caption`` or
  ``Prompt`` found automatically, or named with ``prompt_column``) and optionally a category column
  (``category``/``Category`` found automatically, or ``category_column``);
- ``.json`` — a list of prompts, a list of records, or ``{category: [prompts]}``;
- a folder written by ``datasets.Dataset.save_to_disk`` or a folder of parquet/csv/jsonl files;
- ``hpsv2`` or ``hpsv2:STYLE`` — the HPSv2 benchmark prompts (Wu et al. 2023, arXiv 2306.09341),
  800 per style ``anime``, ``concept-art``, ``paintings``, ``photo``, downloaded from the hub dataset
  ``zhwang/HPDv2`` (``benchmark/STYLE.json``), with the style as category;
- ``shapes:heldout``, ``shapes:train`` or ``shapes:all`` — the synthetic shapes world's captions
  (``diffusion_dpo.synthetic``): its 24 held-out combinations, which no training data of the
  embedded default or the synthetic experiment shows, its 96 training ones, or all 120;
- any other string — a hub dataset id, read with ``datasets.load_dataset(id, split=split,
  streaming=True)``.

Ready-made sets:

=====================  =====================================================================
PartiPrompts (1632)    ``--prompts nateraw/parti-prompts`` (column ``Prompt``, category
                       ``Category``; Yu et al. 2022, arXiv 2206.10789)
HPSv2 benchmark        ``--prompts hpsv2`` (all four styles) or ``--prompts hpsv2:photo``
Pick-a-Pic test        ``--prompts liuhuohuo2/pick-a-pic-v2 --prompt_split test_unique
                       --prompt_column caption`` (500 unique captions; the dataset carries the
                       images too, so the first download is large: save the captions to a .txt once)
=====================  =====================================================================
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt", "caption", "Prompt", "Caption", "text")
CATEGORY_COLUMNS = ("category", "Category")
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
_TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet"}


@dataclass(frozen=True)
class PromptSet:
    """Prompts ``[P]`` and, when the source has them, one category per prompt ``[P]``."""

    prompts: list[str]
    categories: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def _pick_column(columns: list[str], requested: str | None, candidates: tuple[str, ...], what: str, source):
    if requested:
        if requested not in columns:
            raise ValueError(f"{what} column {requested!r} not found in {source}; columns are {columns}")
        return requested
    for name in candidates:
        if name in columns:
            return name
    return None


def _from_records(
    rows: list[dict], source: str, prompt_column: str | None, category_column: str | None
) -> PromptSet:
    if not rows:
        raise ValueError(f"no prompts in {source}: it has no rows")
    columns = list(rows[0].keys())
    prompt_col = _pick_column(columns, prompt_column, PROMPT_COLUMNS, "prompt", source)
    if prompt_col is None:
        raise ValueError(
            f"no prompt column in {source}: looked for {list(PROMPT_COLUMNS)}, columns are {columns}; "
            "name it with --prompt_column"
        )
    cat_col = _pick_column(columns, category_column, CATEGORY_COLUMNS, "category", source)
    prompts, categories = [], []
    for i, row in enumerate(rows):
        text = row.get(prompt_col)
        if text is None or not str(text).strip():
            raise ValueError(f"empty prompt in row {i} (column {prompt_col!r}) of {source}")
        prompts.append(str(text).strip())
        if cat_col is not None:
            cat = row.get(cat_col)
            categories.append("" if cat is None else str(cat))
    return PromptSet(prompts, categories if cat_col is not None else None, source)


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"line {i + 1} of {path} is not valid JSON: {err}") from err
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported prompt file type {suffix!r}: {path}")


def _read_json(path: Path, prompt_column, category_column) -> PromptSet:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {category: [prompts]}, e.g. hpsv2.benchmark_prompts("all") dumped
        rows = [{"prompt": p, "category": cat} for cat, ps in data.items() for p in ps]
        return _from_records(rows, str(path), None, None)
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        return _from_records([{"prompt": p} for p in data], str(path), None, None)
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        return _from_records(data, str(path), prompt_column, category_column)
    raise ValueError(f"{path}: expected a list of prompts, a list of records or {{category: [prompts]}}")


def _read_hpsv2(style: str) -> PromptSet:
    styles = HPSV2_STYLES if style in ("", "all") else (style,)
    for s in styles:
        if s not in HPSV2_STYLES:
            raise ValueError(f"unknown HPSv2 style {s!r}; choose from {list(HPSV2_STYLES)} or 'all'")
    from huggingface_hub import hf_hub_download

    rows = []
    for s in styles:
        path = hf_hub_download("zhwang/HPDv2", f"{s}.json", subfolder="benchmark", repo_type="dataset")
        rows += [{"prompt": p, "category": s} for p in json.loads(Path(path).read_text(encoding="utf-8"))]
    return _from_records(rows, f"hpsv2:{style or 'all'}", None, None)


def _read_dataset(source: str, split: str, prompt_column, category_column, limit: int | None) -> PromptSet:
    import itertools

    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {source}; splits are {list(ds)}")
            ds = ds[split]
    else:
        # Streaming reads only what is iterated; a hub dataset with images is not decoded in full.
        ds = datasets.load_dataset(source, split=split, streaming=True)
    columns = list(ds.column_names or [])
    if columns:
        prompt_col = _pick_column(columns, prompt_column, PROMPT_COLUMNS, "prompt", source)
        if prompt_col is None:
            raise ValueError(
                f"no prompt column in {source}: looked for {list(PROMPT_COLUMNS)}, columns are "
                f"{columns}; name it with --prompt_column"
            )
        cat_col = _pick_column(columns, category_column, CATEGORY_COLUMNS, "category", source)
        keep = [prompt_col] + ([cat_col] if cat_col else [])
        ds = ds.select_columns(keep)
        prompt_column, category_column = prompt_col, cat_col
    rows = list(itertools.islice(ds, limit))  # stop early: a streamed hub dataset is read lazily
    return _from_records(rows, f"{source} (split {split})", prompt_column, category_column)


SHAPES_SETS = {"heldout": True, "train": False, "all": None}


def _read_shapes(which: str) -> PromptSet:
    from diffusion_dpo import synthetic

    if which not in SHAPES_SETS:
        raise ValueError(
            f"unknown shapes prompt set {which!r}: use shapes:heldout, shapes:train or shapes:all"
        )
    specs = synthetic.specs_for(SHAPES_SETS[which])
    return PromptSet([synthetic.caption(s) for s in specs], None, f"shapes:{which}")


def _read_source(source: str, split: str, prompt_column, category_column, max_prompts) -> PromptSet:
    path = Path(source).expanduser()
    if source.startswith("shapes:") and not path.exists():
        return _read_shapes(source.partition(":")[2])
    if source == "hpsv2" or source.startswith("hpsv2:"):
        return _read_hpsv2(source.partition(":")[2])
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            prompts = [ln for ln in lines if ln]
            if not prompts:
                raise ValueError(f"no prompts in {path}: the file has no non-blank lines")
            return PromptSet(prompts, None, str(path))
        if suffix == ".json":
            return _read_json(path, prompt_column, category_column)
        if suffix in _TABLE_SUFFIXES:
            return _from_records(_read_table(path), str(path), prompt_column, category_column)
        raise ValueError(f"unsupported prompt file {path}: use .txt, .json, .jsonl, .csv, .tsv or .parquet")
    if path.is_dir():
        return _read_dataset(str(path), split, prompt_column, category_column, max_prompts)
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_TABLE_SUFFIXES | {".txt", ".json"})):
        raise ValueError(f"prompt file {source!r} does not exist")
    return _read_dataset(source, split, prompt_column, category_column, max_prompts)


def load_prompts(
    source: str | Path,
    *,
    prompt_column: str | None = None,
    category_column: str | None = None,
    split: str = "train",
    max_prompts: int | None = None,
) -> PromptSet:
    """Load an evaluation prompt set (see the module docstring for the accepted sources).

    Args:
        source: file path, folder, ``hpsv2[:STYLE]``, ``shapes:heldout`` (or ``:train``, ``:all``) or
            hub dataset id.
        prompt_column: column holding the prompt; found automatically among ``PROMPT_COLUMNS`` if None.
        category_column: column holding a category per prompt; ``category``/``Category`` are used
            automatically when present.
        split: dataset split for hub ids and saved ``DatasetDict`` folders.
        max_prompts: keep only the first ``max_prompts`` prompts (in source order).

    Raises:
        ValueError: an unreadable source (a bad encoding, invalid JSON or parquet, an unreachable hub
            dataset: always naming the source), a missing column, an empty prompt (naming its row) or
            an empty set.
    """
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    source = str(source)
    try:
        result = _read_source(source, split, prompt_column, category_column, max_prompts)
    except (OSError, ValueError) as err:
        if type(err) is ValueError:  # raised here: it already names the source and the problem
            raise
        # A library's error (bad encoding, invalid JSON or parquet, an unreachable hub) rarely names the file.
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ValueError(f"cannot read prompts from {source}: {reason}") from err
    if max_prompts is not None and len(result) > max_prompts:
        cats = result.categories[:max_prompts] if result.categories is not None else None
        result = PromptSet(result.prompts[:max_prompts], cats, result.source)
    logger.info("loaded %d prompts from %s", len(result), result.source)
    return result
