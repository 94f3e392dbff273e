"""Evaluation: prompt sets, cached generation and scores, statistics, reports (``eval/evaluate.py``).

May import: ``models`` and :mod:`diffusion_dpo.training.saving` (a trained output is loaded and sampled
as it was trained), ``scorers``. :mod:`.stats` and :mod:`.plots` import nothing of the package;
:mod:`.prompts` only the synthetic world's captions (``shapes:heldout``, :mod:`diffusion_dpo.synthetic`).
"""

from diffusion_dpo.evaluation.generate import (
    GenerationSettings,
    ModelLoadError,
    ModelSpec,
    check_cached_image,
    generate_images,
    load_pipeline,
    model_identity,
    parse_model_spec,
    resolve_model,
)
from diffusion_dpo.evaluation.prompts import PromptSet, load_prompts
from diffusion_dpo.evaluation.report import EvalResults, summarize_results, write_report
from diffusion_dpo.evaluation.score_cache import ScoreCache, score_files, score_key
from diffusion_dpo.evaluation.stats import (
    WinRate,
    fit_bradley_terry,
    pairwise_wins,
    summarize,
    win_rate,
    win_rate_by_category,
)

__all__ = [
    "EvalResults",
    "GenerationSettings",
    "ModelLoadError",
    "ModelSpec",
    "PromptSet",
    "ScoreCache",
    "WinRate",
    "check_cached_image",
    "fit_bradley_terry",
    "generate_images",
    "load_pipeline",
    "load_prompts",
    "model_identity",
    "pairwise_wins",
    "parse_model_spec",
    "resolve_model",
    "score_files",
    "score_key",
    "summarize",
    "summarize_results",
    "win_rate",
    "win_rate_by_category",
    "write_report",
]
