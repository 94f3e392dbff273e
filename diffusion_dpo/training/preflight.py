"""Checks made before a run loads or builds anything: every path and hub id it will read exists.

A mistyped dataset path found only after the models load costs minutes for a real model (SDXL,
SD3.5), and a failed start must leave nothing behind. So :func:`check_sources` looks at each source
the config names (base model, VAE, training and held-out data, latent cache, checkpoint to resume),
cheaply: a local path must exist (``model_index.json`` for a pipeline folder, a supported file or a
dataset folder for data); a hub id must resolve, by reading one small file (the model's
``model_index.json``, the dataset's builder), from the local cache when the hub is unreachable or
``HF_HUB_OFFLINE=1``. Each problem is one line naming the flag and the value.

With ``create_tiny_assets`` a missing path inside ``./outputs/`` is not a problem: the embedded
default builds it (:func:`is_embedded_asset_path`). Nothing else
is built, so a wrong ``--dataset_name`` is an error, never a synthetic dataset written there.

:func:`no_empty_folder_on_failure` removes the output folders a failed start created while they hold
no file, so a run that stopped before writing anything leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import warnings
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig


def is_embedded_asset_path(path: str | Path, kind: str) -> bool:
    """Whether ``create_tiny_assets`` may build a missing ``path``: a relative path inside ``outputs/``
    of the working directory (no ``..``, no ``~``), and for ``kind="dataset"`` a ``.parquet`` file (what
    the builder writes); ``kind="model"`` is the base model's folder."""
    text = str(path)
    parts = Path(text).parts
    inside = (
        not Path(text).is_absolute()
        and not text.startswith("~")
        and len(parts) >= 2
        and parts[0] == "outputs"
        and ".." not in parts
    )
    if kind == "dataset":
        return inside and Path(text).suffix.lower() == ".parquet"
    return inside


#: dataset files the loaders read (diffusion_dpo.data.pairs.load_rows)
DATASET_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ``./``, ``~``, a file suffix,
    two slashes, a backslash) names a local path, and so does anything that exists on disk."""
    return (
        os.path.exists(os.path.expanduser(name))
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or Path(name).suffix.lower() in DATASET_SUFFIXES
        or name.count("/") > 1
        or "\\" in name
    )


@functools.cache
def _model_problem(name: str, revision: str | None, options: tuple) -> str | None:
    from diffusion_dpo.models.families import family_for_index
    from diffusion_dpo.models.pretrained import read_model_index

    try:
        with warnings.catch_warnings():  # diffusers passes the hub a deprecated argument
            warnings.simplefilter("ignore")
            index = read_model_index(name, revision)
    except OSError as err:
        return _one_line(err)
    # a pipeline of no supported family, or options it does not take: its own ValueError, now
    family_for_index(index, name, **dict(options))
    return None


@functools.cache
def _hub_vae_problem(name: str) -> str | None:
    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AutoencoderKL.load_config(name)
    except Exception as err:  # hub errors come in many types
        return (
            f"could not read the VAE config of {name!r} on the hub ({type(err).__name__}: {_one_line(err)})"
        )
    return None


@functools.cache
def _hub_dataset_problem(name: str, cache_dir: str | None) -> str | None:
    import datasets

    try:
        datasets.load_dataset_builder(name, cache_dir=cache_dir)
    except Exception as err:  # hub errors come in many types
        return (
            f"it is not a local file or folder, and the hub dataset {name!r} cannot be resolved "
            f"({type(err).__name__}: {_one_line(err)})"
        )
    return None


def _local_dataset_problem(path: Path) -> str | None:
    if path.is_file():
        if path.suffix.lower() not in DATASET_SUFFIXES:
            return f"unsupported file type {path.suffix!r} (expected one of {list(DATASET_SUFFIXES)})"
        return None
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return None
        if next(path.rglob("*.parquet"), None) is not None:
            return None
        return (
            "a folder with neither a save_to_disk dataset (dataset_dict.json, state.json) nor parquet files"
        )
    return "does not exist (no such file or folder)"


def source_problems(cfg: TrainConfig, build_missing: bool = False) -> list[str]:
    """One line per source of ``cfg`` that cannot be read, naming its flag; [] when all can.
    ``build_missing``: missing paths the embedded default builds (``create_tiny_assets``) are fine."""
    problems = []
    tiny_note = (
        "; create_tiny_assets builds missing paths only inside ./outputs/ (the embedded default's)"
        if cfg.create_tiny_assets
        else ""
    )

    model = cfg.pretrained_model_name_or_path
    if model and looks_like_local_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            if not (build_missing and is_embedded_asset_path(model, "model")):
                problems.append(f"--pretrained_model_name_or_path {model}: does not exist{tiny_note}")
        elif not (path / "model_index.json").is_file():
            problems.append(
                f"--pretrained_model_name_or_path {model}: not a diffusers pipeline folder (no model_index.json)"
            )
        elif problem := _model_problem(str(path), None, tuple(sorted(cfg.family_options().items()))):
            problems.append(f"--pretrained_model_name_or_path {model}: {problem}")
    elif model:
        problem = _model_problem(model, cfg.revision, tuple(sorted(cfg.family_options().items())))
        if problem:
            problems.append(f"--pretrained_model_name_or_path {model}: {problem}")

    vae = cfg.vae_model_name_or_path
    if vae and looks_like_local_path(vae):
        if not (Path(vae).expanduser() / "config.json").is_file():
            what = "does not exist" if not Path(vae).expanduser().exists() else "has no config.json"
            problems.append(f"--vae_model_name_or_path {vae}: {what} (expected an AutoencoderKL folder)")
    elif vae and (problem := _hub_vae_problem(vae)):
        problems.append(f"--vae_model_name_or_path {vae}: {problem}")

    datasets_read = [("validation_dataset_name", cfg.validation_dataset_name)]
    if not cfg.latents_cache:  # a cached run reads its pairs from the cache, not from --dataset_name
        datasets_read.insert(0, ("dataset_name", cfg.dataset_name))
    for flag, name in datasets_read:
        if not name:
            continue
        if looks_like_local_path(name):
            path = Path(name).expanduser()
            if not path.exists() and build_missing and is_embedded_asset_path(name, "dataset"):
                continue
            problem = _local_dataset_problem(path)
            if problem:
                problems.append(f"--{flag} {name}: {problem}{tiny_note if not path.exists() else ''}")
        elif problem := _hub_dataset_problem(name, cfg.cache_dir):
            problems.append(f"--{flag} {name}: {problem}")

    if cfg.latents_cache and not (Path(cfg.latents_cache) / "manifest.json").is_file():
        what = (
            "does not exist"
            if not Path(cfg.latents_cache).exists()
            else "is not a latent cache (no manifest.json)"
        )
        problems.append(
            f"--latents_cache {cfg.latents_cache}: {what}; make it with "
            f"`python data/precompute_latents.py --output_dir {cfg.latents_cache} ...`"
        )
    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest" and not (Path(resume) / "training_state.json").is_file():
        problems.append(
            f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no training_state.json)"
        )
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"--output_dir {cfg.output_dir}: exists and is not a folder")
    return problems


def check_sources(cfg: TrainConfig, build_missing: bool = False) -> None:
    """Raise ``FileNotFoundError`` naming every source of ``cfg`` that cannot be read, one line each
    (see :func:`source_problems`); cheap, so it runs before any model is loaded or built."""
    problems = source_problems(cfg, build_missing)
    if len(problems) == 1:
        raise FileNotFoundError(problems[0])
    if problems:
        raise FileNotFoundError(
            f"{len(problems)} inputs cannot be read (nothing was loaded or written):\n  "
            + "\n  ".join(problems)
        )


@contextlib.contextmanager
def no_empty_folder_on_failure(output_dir: str | Path):
    """On an exception, remove the folders on the way to ``output_dir`` that did not exist before and
    still hold no file (empty subfolders such as ``logs/`` do not count), deepest first."""
    path = Path(output_dir).absolute()
    created = [p for p in [path, *path.parents] if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for folder in created:
            if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
                shutil.rmtree(folder)
            elif folder.exists():
                break
        raise
