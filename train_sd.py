#!/usr/bin/env python
"""Fine-tune text-to-image diffusion models on preferences: Diffusion-DPO, SFT, Diffusion-KTO or MaPO.

    python train_sd.py --config configs/tiny.yaml                 # the embedded default, CPU, minutes
    accelerate launch train_sd.py --config configs/sd15_dpo.yaml  # the paper's SD1.5 run, multi-GPU

Command-line flags override the YAML; `python train_sd.py --help` lists them all, by group. The run ends
with a few lines saying whether it learned and where the model is; the numbers are in
OUTPUT_DIR/summary.json, the model card in OUTPUT_DIR/README.md (`--push_to_hub` uploads both). A rerun
of a finished run with the same options shows its summary instead of training again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from diffusion_dpo.synthetic.base import ensure_tiny_assets
from diffusion_dpo.training import hub
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.console import setup_logging
from diffusion_dpo.training.guards import RunStopped
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.model_card import write_model_card
from diffusion_dpo.training.preflight import check_sources, no_empty_folder_on_failure
from diffusion_dpo.training.previous_run import finished_run
from diffusion_dpo.training.summary import describe_run


def _publish(cfg, repo_id: str | None, global_step: int) -> None:
    if repo_id is not None:
        write_model_card(cfg, global_step, repo_id=repo_id)  # the card's usage names the Hub id
        print(f"  pushed to the Hub: {hub.push_output(cfg, repo_id)}")


def main(argv: list[str] | None = None) -> dict:
    setup_logging()  # from the first line: the embedded default builds its base for over a minute first
    cfg = parse_config(argv)
    main_process = os.environ.get("RANK", "0") == "0"
    # every path and hub id, and the Hub flags, before the tiny assets are built or a model loads
    check_sources(cfg, build_missing=cfg.create_tiny_assets)
    hub.check_hub_args(cfg)
    repo_id = hub.create_hub_repo(cfg) if cfg.push_to_hub and main_process else None
    done = None if cfg.overwrite_output_dir or cfg.resume_from_checkpoint else finished_run(cfg)
    if done is not None:  # this same run, finished: shown, not retrained over
        if main_process:
            print(
                f"{cfg.output_dir} already holds this run, finished with the same options: nothing to "
                "train (--overwrite_output_dir trains it again). Its summary:"
            )
            print(describe_run(cfg, done))
            if not (Path(cfg.output_dir) / "README.md").is_file():  # a run of an earlier version
                write_model_card(cfg, done["global_step"])
            _publish(cfg, repo_id, done["global_step"])
        return done
    with no_empty_folder_on_failure(cfg.output_dir):
        if cfg.create_tiny_assets:
            ensure_tiny_assets(cfg)
        summary = train(cfg)
    if summary["is_main_process"]:
        shown = {k: v for k, v in summary.items() if k not in ("models", "is_main_process")}
        path = Path(cfg.output_dir) / "summary.json"
        path.write_text(json.dumps({"output_dir": cfg.output_dir, **shown}, indent=2) + "\n")
        print(describe_run(cfg, summary))
        _publish(cfg, repo_id, summary["global_step"])
    return summary


if __name__ == "__main__":
    try:
        main()
    except RunStopped as stop:  # stopped on purpose after a checkpoint: the message says what next
        if os.environ.get("RANK", "0") == "0":  # every process stops; one says why
            print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what is wrong, no stack trace
        sys.exit(f"error: {err}")
