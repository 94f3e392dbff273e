"""Held-out win rate of the policy's samples against the reference's during training
(``--validation_scorer``; docs/monitors.md).

Every ``--validation_steps`` the held-out prompts are sampled from the current weights and from the
reference with the same seeds and the run's sampling settings (the pipeline validation images are made
with, :func:`~diffusion_dpo.training.saving.training_pipeline`), both are scored, and the paired win
rate (ties 1/2) with its 95% cluster-bootstrap interval over prompts
(:func:`diffusion_dpo.evaluation.stats.win_rate`, what ``eval/evaluate.py`` reports) goes into the
step's row as ``eval/win_rate``, ``eval/win_rate_ci_low``, ``eval/win_rate_ci_high``.

- The reference is sampled and scored once (it does not change: a frozen model, or the LoRA base under
  disabled adapters) and its scores kept; a resumed run scores it again at its first validation (the
  same numbers: images are functions of weights, prompt and seed).
- With N processes the prompts are split into contiguous slices and the scores gathered; one prompt's
  images are one pipeline call (its seeds), so an image does not depend on the split and N processes
  report what one does.
- The torch RNG state is saved before and restored after, so a run with the win rate trains exactly as
  one without it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from diffusion_dpo.diffusion import adapters_disabled
from diffusion_dpo.evaluation.stats import win_rate
from diffusion_dpo.scorers import load_scorer
from diffusion_dpo.training.saving import sample_prompt_images, training_pipeline

logger = logging.getLogger(__name__)

KEYS = ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high")


def validation_prompts(cfg, heldout) -> list[str]:
    """What the win rate samples: ``--validation_prompts``, else the distinct non-empty captions of the
    held-out pairs (in the order they come)."""
    if cfg.validation_prompts:
        return list(cfg.validation_prompts)
    captions = list(dict.fromkeys(c for c in (heldout.captions if heldout is not None else []) if c.strip()))
    if not captions:
        raise ValueError(
            f"--validation_scorer: the held-out pairs of {cfg.validation_dataset_name} have no captions to "
            "sample; give --validation_prompts"
        )
    return captions


class SampleWinRate:
    """The scorer, the prompts and seeds, and the reference's cached scores ``[P, S]``."""

    def __init__(self, cfg, prompts: list[str], device, scorer=None):
        self.cfg, self.prompts = cfg, list(prompts)
        self.seeds = [cfg.seed + k for k in range(cfg.num_validation_images)]
        self.scorer = scorer if scorer is not None else load_scorer(cfg.validation_scorer, device=device)
        self.reference_scores: np.ndarray | None = None

    def measure(self, models, accelerator) -> dict[str, float]:
        """The row's win-rate keys (and each model's mean score) at this validation; the same on every
        process."""
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training's RNG stream is left as it was
            unet = accelerator.unwrap_model(models.unet)
            if self.reference_scores is None:
                if models.ref_unet is not None:
                    self.reference_scores = self._scores(models, models.ref_unet, accelerator)
                else:  # LoRA: the base under the adapters
                    with adapters_disabled(unet) as base:
                        self.reference_scores = self._scores(models, base, accelerator)
            policy = self._scores(models, unet, accelerator)
        result = win_rate(policy, self.reference_scores)
        return {
            "eval/win_rate": result.win_rate,
            "eval/win_rate_ci_low": result.ci_low,
            "eval/win_rate_ci_high": result.ci_high,
            "eval/score_policy": float(policy.mean()),
            "eval/score_reference": float(self.reference_scores.mean()),
        }

    @torch.no_grad()
    def _scores(self, models, denoiser, accelerator) -> np.ndarray:
        """``[P, S]`` scores of ``denoiser``'s samples: this process's slice of prompts, then gathered."""
        n, seeds = len(self.prompts), self.seeds
        processes, rank = accelerator.num_processes, accelerator.process_index
        per_process = -(-n // processes)
        mine = range(rank * per_process, min((rank + 1) * per_process, n))
        scores = torch.zeros(per_process, len(seeds))  # the last slices are padded, then cut
        if len(mine):
            pipe = training_pipeline(self.cfg, models, denoiser)
            was_training = denoiser.training
            denoiser.eval()
            try:
                for row, p in enumerate(mine):
                    images = sample_prompt_images(self.cfg, models, pipe, self.prompts[p], seeds)
                    scores[row] = self.scorer(images, [self.prompts[p]] * len(seeds))
            finally:
                denoiser.train(was_training)
        if processes > 1:
            scores = accelerator.gather(scores.to(accelerator.device)).cpu()
        return scores[:n].double().numpy()
