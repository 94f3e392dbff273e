"""An output folder that already holds a run: reused when it is this run, finished; otherwise the new
run says, before it trains, that it starts over.

Rerunning the README's first command used to retrain silently over the first run's checkpoints. Now
a finished run with the same options (``training_config.yaml``, ``summary.json`` at the configured
step count, the saved model) is shown and kept: nothing is retrained (``--overwrite_output_dir`` trains
again). Anything else found there (another config's result, checkpoints of an unfinished run) gets a
warning naming what differs and how to continue it instead (``--resume_from_checkpoint latest``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from diffusion_dpo.training.checkpoint import list_checkpoints
from diffusion_dpo.training.config import TrainConfig

#: options that change where a run is reported or published, not what it trains
NOT_THE_RUN = (
    "resume_from_checkpoint", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_token",
    "report_to", "logging_dir", "dataloader_num_workers",
)  # fmt: skip
CONFIG_FILE, SUMMARY_FILE = "training_config.yaml", "summary.json"


def _saved(out: Path) -> tuple[dict | None, dict | None]:
    config = yaml.safe_load((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).is_file() else None
    summary = json.loads((out / SUMMARY_FILE).read_text()) if (out / SUMMARY_FILE).is_file() else None
    return config, summary


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``["beta_dpo 50 -> 100", ...]``: the options of ``cfg`` that differ from a saved run's (an option
    the saved file lacks, from an older version, counts as its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    current = cfg.to_dict()
    differences = []
    for name, value in current.items():
        if name in NOT_THE_RUN:
            continue
        before = saved.get(name, defaults[name])
        before = list(before) if isinstance(before, tuple) else before
        if before != value:
            differences.append(f"{name} {before!r} -> {value!r}")
    return differences


def _has_model(out: Path) -> bool:
    return (out / "model_index.json").is_file() or (out / "pytorch_lora_weights.safetensors").is_file()


def finished_run(cfg: TrainConfig) -> dict | None:
    """The saved summary when ``output_dir`` holds this run, finished: same options (those in
    :data:`NOT_THE_RUN` aside), all ``max_train_steps`` done, the model saved; else None."""
    out = Path(cfg.output_dir)
    config, summary = _saved(out)
    if config is None or summary is None or not _has_model(out):
        return None
    if summary.get("global_step") != cfg.max_train_steps or config_differences(config, cfg):
        return None
    return summary


def starting_over_note(cfg: TrainConfig) -> str | None:
    """What a fresh (not resumed) run in ``output_dir`` replaces there, in words; None for an empty or
    new folder."""
    out = Path(cfg.output_dir)
    config, summary = _saved(out)
    checkpoints = list_checkpoints(out)
    if summary is None and not checkpoints and not _has_model(out):
        return None
    if summary is not None and config is not None:
        differences = config_differences(config, cfg)
        if not differences and summary.get("global_step") == cfg.max_train_steps:
            what = "this same run, finished (--overwrite_output_dir)"
        else:
            steps = summary.get("global_step")
            changed = differences or [f"max_train_steps {steps} -> {cfg.max_train_steps}"]
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            what = f"a finished run of other options ({shown})"
        return (
            f"starting over in {out}: it holds {what}; this run replaces its model, metrics and summary, "
            "and its checkpoints as this run saves its own"
        )
    if checkpoints:
        return (
            f"starting over in {out}: it holds checkpoints of an earlier run that did not finish (newest "
            f"{checkpoints[-1].name}); this run replaces them as it saves its own. To continue that run "
            "instead, stop this one and pass --resume_from_checkpoint latest"
        )
    return f"starting over in {out}: it holds a saved model of an earlier run, which this run replaces"


def start_over(cfg: TrainConfig) -> str | None:
    """For a fresh run in ``output_dir``: :func:`starting_over_note`, and the earlier ``summary.json``
    removed, so that the folder no longer claims a finished run while this one replaces it."""
    note = starting_over_note(cfg)
    if note is not None:
        (Path(cfg.output_dir) / SUMMARY_FILE).unlink(missing_ok=True)
    return note
