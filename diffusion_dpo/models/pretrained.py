"""Reading a pretrained pipeline's files: its ``model_index.json``, the dtype keyword of
``from_pretrained``, and quiet loads.

This is the floor of :mod:`diffusion_dpo.models`: the families (:mod:`.families`) and the loader
(:mod:`.loading`) both stand on it, and it imports nothing of the package (so a new family module
imports it, never :mod:`.loading`, which imports the families).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


def read_model_index(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """``model_index.json`` of a local folder or a hub repository, with a clear error if absent."""
    local = Path(pretrained_model_name_or_path)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{local} is not a diffusers pipeline folder: it has no model_index.json "
                "(expected subfolders unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return json.loads(index.read_text())
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision)
    except Exception as err:  # hub errors come in many types; say what was asked for
        raise FileNotFoundError(
            f"could not read model_index.json of {pretrained_model_name_or_path!r}: it is neither a local "
            f"folder nor a reachable hub repository ({type(err).__name__}: {err})"
        ) from err


def dtype_kwargs(dtype: torch.dtype, library: str = "diffusers") -> dict:
    """The keyword that makes ``from_pretrained`` of ``library`` (diffusers or transformers) load in ``dtype``.

    Both renamed ``torch_dtype`` to ``dtype`` (transformers 4.56, diffusers 0.42) and warn on the old
    name; older versions know only ``torch_dtype``. Loading in the dtype, rather than casting after,
    also keeps diffusers from warning about ``to(dtype)`` on every load.
    """
    if library == "transformers":
        import transformers
        from packaging.version import Version

        new = Version(transformers.__version__) >= Version("4.56")
    else:  # diffusers' helper that resolves the two names exists exactly in the versions taking dtype
        from diffusers.utils import deprecation_utils

        new = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """Hide diffusers' and transformers' progress bars ("Loading pipeline components", "Loading weights",
    "Writing model shards") inside the block: loads and saves a run makes for itself take milliseconds
    to seconds and say nothing a user acts on. Hub downloads keep their progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    shown = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    hub_shown = not are_progress_bars_disabled()
    for lib, _ in shown:
        lib.disable_progress_bar()
    if hub_shown:  # transformers' switch turns the hub's download bars off too: a download must show
        enable_progress_bars()
    try:
        yield
    finally:
        for lib, was_shown in shown:
            if was_shown:
                lib.enable_progress_bar()
        if not hub_shown:
            disable_progress_bars()
