#!/usr/bin/env python
"""Fine-tune Stable Diffusion (SD1.x / SDXL) on preferences: Diffusion-DPO, SFT, Diffusion-KTO or MaPO.

    python train_sd.py --config configs/tiny.yaml                 # the embedded default, CPU, minutes
    accelerate launch train_sd.py --config configs/sd15_dpo.yaml  # the paper's SD1.5 run, multi-GPU

Command-line flags override the YAML; `python train_sd.py --help` lists them all. The run ends with a
few lines saying whether it learned and where the model is; the numbers are in OUTPUT_DIR/summary.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from diffusion_dpo.synthetic.base import ensure_tiny_assets
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.guards import RunStopped
from diffusion_dpo.training.loop import train
from diffusion_dpo.training.summary import describe_run


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    if cfg.create_tiny_assets:
        ensure_tiny_assets(cfg)
    summary = train(cfg)
    if summary["is_main_process"]:
        shown = {k: v for k, v in summary.items() if k not in ("models", "is_main_process")}
        path = Path(cfg.output_dir) / "summary.json"
        path.write_text(json.dumps({"output_dir": cfg.output_dir, **shown}, indent=2) + "\n")
        print(describe_run(cfg, summary))
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
