"""``--push_to_hub``: the trained output, with its model card, uploaded to the Hugging Face Hub.

As diffusers' training scripts (``examples/text_to_image/train_text_to_image_lora.py``): the repository
is ``--hub_model_id`` or the output folder's name, created (``exist_ok``) before training so that a
bad id or token fails in seconds rather than after the run, and the output folder is uploaded at the
end with ``upload_folder`` (commit "End of training"), without the resumable checkpoints and tracker
logs. ``--hub_token`` with ``--report_to wandb`` is refused, as diffusers refuses it: the tracker would
record the token.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)

#: what stays out of the upload: resumable state (optimizer moments: twice the weights) and
#: half-written folders; the trackers' logs (--logging_dir) too
IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "*.old"]


def hub_repo_name(cfg: TrainConfig) -> str:
    """``--hub_model_id``, else the output folder's name (diffusers' default)."""
    return cfg.hub_model_id or Path(cfg.output_dir).absolute().name


def check_hub_args(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for Hub flags that cannot work; no network. Called before anything runs."""
    if not cfg.push_to_hub:
        if cfg.hub_model_id or cfg.hub_token:
            logger.warning("--hub_model_id/--hub_token have no effect without --push_to_hub")
        return
    if cfg.hub_token is not None and cfg.report_to in ("wandb", "all"):
        raise ValueError(
            "--hub_token cannot be used with --report_to wandb: wandb would record the token with the run's "
            "config. Log in with `hf auth login` instead and drop --hub_token"
        )
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = hub_repo_name(cfg)
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        where = (
            "--hub_model_id"
            if cfg.hub_model_id
            else f"the output folder's name (--output_dir {cfg.output_dir})"
        )
        raise ValueError(
            f"--push_to_hub: {where} {name!r} is not a valid Hub repository id ({err}); pass --hub_model_id "
            "owner/name"
        ) from None
    if cfg.hub_token is None and get_token() is None:
        raise ValueError(
            f"--push_to_hub: no Hub token to create {name!r} with; run `hf auth login` (or set HF_TOKEN), "
            "or pass --hub_token"
        )


def create_hub_repo(cfg: TrainConfig) -> str:
    """Create (or find) the repository before training; returns its full id ``owner/name``."""
    from huggingface_hub import create_repo

    name = hub_repo_name(cfg)
    try:
        repo_id = create_repo(repo_id=name, exist_ok=True, token=cfg.hub_token).repo_id
    except Exception as err:  # hub errors come in many types: one line naming what was asked
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"--push_to_hub: could not create or open the Hub repository {name!r} ({type(err).__name__}: {text})"
        ) from None
    logger.info("--push_to_hub: the result goes to https://huggingface.co/%s at the end", repo_id)
    return repo_id


def push_output(cfg: TrainConfig, repo_id: str) -> str:
    """Upload ``output_dir`` (model, card, samples, metrics; no checkpoints) to ``repo_id``."""
    from huggingface_hub import upload_folder

    commit = upload_folder(
        repo_id=repo_id,
        folder_path=cfg.output_dir,
        commit_message="End of training",
        ignore_patterns=[*IGNORE_PATTERNS, f"{Path(cfg.logging_dir).as_posix().strip('/')}/*"],
        token=cfg.hub_token,
    )
    logger.info("pushed %s to https://huggingface.co/%s", cfg.output_dir, repo_id)
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
