"""The words a run ends with: what was trained, whether it learned, and where everything is."""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig

#: The "at the start" and "at the end" numbers average this share of the steps (at least MIN_WINDOW):
#: single steps of a preference loss are noisy.
WINDOW_SHARE, MIN_WINDOW = 0.1, 10

_NAMES = {"dpo": "Diffusion-DPO", "sft": "SFT", "kto": "Diffusion-KTO", "mapo": "MaPO"}


#: The embedded default's evaluation (:func:`evaluate_command`): the synthetic world's held-out
#: prompts, each with this many seeds, scored for faithfulness.
TINY_EVAL_PROMPTS, TINY_EVAL_SCORER, TINY_EVAL_SEEDS = "shapes:heldout", "shapes", 8


def evaluate_command(cfg: TrainConfig) -> str:
    """The ``eval/evaluate.py`` command comparing this run's output with the model it started from.
    The embedded defaults (``create_tiny_assets``) get their world's held-out prompts and faithfulness
    scorer; any other run a placeholder prompt file and PickScore; a run with held-out pairs adds them
    for the implicit accuracy. Sampling steps and guidance are not named: evaluate.py reads the ones
    this run recorded (``training_config.yaml``)."""
    out = Path(cfg.output_dir)
    if cfg.create_tiny_assets:
        data = f"--prompts {TINY_EVAL_PROMPTS} --scorer {TINY_EVAL_SCORER} --num_images_per_prompt {TINY_EVAL_SEEDS}"
    else:
        data = "--prompts PROMPTS.txt --scorer pickscore --num_images_per_prompt 4"
    if cfg.validation_dataset_name:  # the report then says whether accuracy and win rate agree
        data += f" --implicit_pairs {cfg.validation_dataset_name}"
    name = cfg.effective_objective
    return (
        f"python eval/evaluate.py --model base={cfg.pretrained_model_name_or_path} --model {name}={out} "
        f"{data} --output_dir {out.parent / (out.name + '_eval')}"
    )


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def describe_run(cfg: TrainConfig, summary: dict) -> str:
    """A few lines for a person: the held-out implicit-reward accuracy at the start and the end (when
    held-out pairs were given), the loss and the reward margin early and late, skipped steps and rows,
    and where the model, the samples and the metrics are."""
    out = Path(cfg.output_dir)
    rows = []
    if (out / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    objective = cfg.effective_objective
    name = _NAMES.get(objective, objective)
    if objective == "dpo" and cfg.loss_type != "sigmoid":
        name += f" ({cfg.loss_type} loss)"
    lines = [f"{name}: {summary['global_step']} steps in {summary['seconds']:.0f} s."]

    accuracies = [r for r in rows if r.get("eval/implicit_acc") is not None]
    if accuracies:
        end = accuracies[-1]
        lines.append(
            f"  held-out implicit-reward accuracy: 0.50 at the start (the model equals its reference, "
            f"so every pair ties) -> {end['eval/implicit_acc']:.2f} at step {end['step']}: the share of "
            f"held-out pairs whose preferred image the model now prefers (0.5 is chance)."
        )
    wins = [r for r in rows if r.get("eval/win_rate") is not None]
    if wins:
        curve = ", ".join(f"{r['eval/win_rate']:.2f}" for r in wins[:-1][-4:])
        end = wins[-1]
        lines.append(
            f"  held-out win rate of samples vs the reference ({cfg.validation_scorer}): "
            + (f"{curve} -> " if curve else "")
            + f"{end['eval/win_rate']:.2f} [{end['eval/win_rate_ci_low']:.2f}, "
            f"{end['eval/win_rate_ci_high']:.2f}] at step {end['step']} (0.5: as good as the reference)."
        )
    window = max(MIN_WINDOW, int(len(rows) * WINDOW_SHARE))
    first, last = rows[:window], rows[-window:]
    loss_first, loss_last = _mean(first, "loss"), _mean(last, "loss")
    if loss_first is not None and loss_last is not None:
        trend = "down" if loss_last < loss_first else "up"
        why = ""
        if trend == "up" and objective == "dpo" and cfg.loss_type == "sigmoid":
            # -log σ(β·margin) is about β·|margin| on a pair still ranked wrongly: as the model moves,
            # those pairs' margins grow, so the mean can rise while more pairs are ranked right
            why = (
                "; at this β the loss is dominated by the pairs still ranked wrongly, whose margins grow "
                "as the model moves, so it can rise while the model learns: the held-out accuracy and "
                "the evaluation below say whether it did"
            )
        lines.append(
            f"  loss: {loss_first:.3f} over the first {len(first)} steps -> {loss_last:.3f} over the last "
            f"{len(last)} ({trend}{why})."
        )
    margin_first, margin_last = _mean(first, "rewards/margins"), _mean(last, "rewards/margins")
    if margin_first is not None and margin_last is not None:
        lines.append(
            f"  reward margin (implicit reward of the preferred image minus the other's): "
            f"{margin_first:+.3f} -> {margin_last:+.3f}; training-pair accuracy "
            f"{_mean(last, 'rewards/accuracies') or 0:.2f} over the last {len(last)} steps."
        )
    lines += _monitor_lines(last, summary.get("monitors/warnings", []))
    skipped_steps, skipped_rows = summary.get("train/skipped_steps", 0), summary.get("data/skipped_rows", 0)
    if skipped_steps or skipped_rows:
        lines.append(
            f"  skipped: {skipped_steps} non-finite optimizer steps, {skipped_rows} bad rows "
            f"(first: {summary.get('data/bad_rows', [])[:3]})."
        )
    # trained without T5 (SD3 --drop_t5): loaded without it, as trained; diffusers needs to be told
    no_t5 = ", text_encoder_3=None, tokenizer_3=None" if cfg.drop_t5 else ""
    if cfg.use_lora:
        lines.append(
            f"  model: LoRA weights in {out}/pytorch_lora_weights.safetensors; load them with "
            f"DiffusionPipeline.from_pretrained({cfg.pretrained_model_name_or_path!r}{no_t5})"
            f".load_lora_weights({str(out)!r})"
        )
    else:
        lines.append(f"  model: {out} (DiffusionPipeline.from_pretrained({str(out)!r}{no_t5}))")
    samples = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    if samples:
        lines.append(f"  samples: {len(samples)} images of the validation prompts in {out / 'samples'}")
    lines.append(
        f"  metrics: {out / 'metrics.jsonl'} (one line per step); this summary: {out / 'summary.json'}"
    )
    lines.append(f"  compare its images with the base's: {evaluate_command(cfg)}")
    return "\n".join(lines)


def _monitor_lines(last: list[dict], warnings: list[dict]) -> list[str]:
    """The monitors over the last steps (docs/monitors.md) and the warnings they raised, if any."""
    parts = []
    for key, label, fmt in (
        ("monitors/chosen_vs_ref", "winner's error vs the reference", "{:+.4f}"),
        ("monitors/rejected_vs_ref", "loser's", "{:+.4f}"),
        ("monitors/negative_margins", "pairs with a negative margin", "{:.0%}"),
        ("monitors/grad_factor", "gradient factor σ(−βδ)", "{:.2f}"),
        ("monitors/pred_norm_ratio", "prediction norm / reference's", "{:.3f}"),
        ("train/beta", "β (--auto_beta)", "{:.4g}"),
    ):
        value = _mean(last, key)
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    lines = []
    if parts:  # the step monitors exist for --objective dpo; the validation ones may warn for any
        lines.append(f"  monitors over the last {len(last)} steps: " + "; ".join(parts) + ".")
        if not warnings:
            lines.append("  monitors: no warning (docs/monitors.md says what each one watches).")
    for warning in warnings:
        lines.append(f"  WARNING {warning['monitor']}: {warning['message']}")
    return lines
