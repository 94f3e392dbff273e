"""The ``README.md`` model card of a trained output: what was trained, from what, on what, and how well.

As diffusers' training scripts do, the card's metadata names ``library_name: diffusers``, the base
model, the datasets and diffusers' tags for the family (plus ``diffusion-dpo`` and the objective); the
run's facts (objective, loss type, β, data, steps, held-out implicit accuracy, and the win rate once
``eval/evaluate.py`` has compared the model with its base) are both in the metadata, under
``diffusion_dpo``, and in the text. Built with huggingface_hub's ``ModelCard``/``ModelCardData`` and
diffusers' ``populate_model_card``, so ``ModelCard.load(output_dir / "README.md")`` reads it back and
the Hub shows it. Not diffusers' ``load_or_create_model_card``: its template is a page of TODOs, and it
looks the card up on the Hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.preflight import looks_like_local_path

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
FIELDS = set(TrainConfig.__dataclass_fields__)
TAG = "diffusion-dpo"
#: diffusers' training scripts' tags per family (``family.name``); a family not listed gets
#: ``<name>``, ``<name>-diffusers`` as diffusers' Flux and newer scripts do
FAMILY_TAGS = {
    "sd": ("stable-diffusion", "stable-diffusion-diffusers"),
    "sdxl": ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    "sd3": ("sd3", "sd3-diffusers"),
}
METHODS = {"dpo": "Diffusion-DPO", "sft": "SFT (supervised fine-tuning on the preferred images)",
           "kto": "Diffusion-KTO", "mapo": "MaPO"}  # fmt: skip


def _hub_id(name) -> str | None:
    return str(name) if name and not looks_like_local_path(str(name)) else None


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def run_facts(cfg: TrainConfig, family_name: str, global_step: int, num_processes: int = 1) -> dict:
    """The run's facts for the card's metadata: plain values, read back by ``ModelCard.load``."""
    objective = cfg.effective_objective
    facts = {
        "family": family_name,
        "objective": objective,
        "loss_type": cfg.loss_type if objective == "dpo" else None,
        "beta": {"dpo": cfg.beta_dpo, "kto": cfg.beta_dpo, "mapo": cfg.beta_mapo}.get(objective),  # SFT: none
        "fine_tune": f"LoRA rank {cfg.rank}" if cfg.use_lora else "full",
        "base_model": str(cfg.pretrained_model_name_or_path),
        "dataset": str(cfg.dataset_name),
        "dataset_split": cfg.dataset_split,
        "steps": global_step,
        "processes": num_processes,
        "total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes,
        "learning_rate": cfg.learning_rate,
        "resolution": cfg.resolution,
        "mixed_precision": cfg.mixed_precision,
        "seed": cfg.seed,
    }
    accuracies = [r for r in _metrics(Path(cfg.output_dir)) if _finite(r.get("eval/implicit_acc"))]
    if accuracies:
        facts["heldout_implicit_accuracy"] = round(accuracies[-1]["eval/implicit_acc"], 4)
        facts["heldout_dataset"] = str(cfg.validation_dataset_name)
        facts["heldout_pairs"] = cfg.num_validation_pairs
    return {k: v for k, v in facts.items() if v is not None}


def family_tags(family_name: str) -> list[str]:
    return list(FAMILY_TAGS.get(family_name, (family_name, f"{family_name}-diffusers")))


def _body(cfg: TrainConfig, facts: dict, evaluation: dict | None, repo_id: str | None) -> str:
    method = METHODS.get(facts["objective"], facts["objective"])
    if facts.get("loss_type") and facts["loss_type"] != "sigmoid":
        method += f" ({facts['loss_type']} loss)"
    base = facts["base_model"]
    base_link = f"[{base}](https://huggingface.co/{base})" if _hub_id(base) else f"`{base}` (a local model)"
    data = facts["dataset"]
    data_link = f"[{data}](https://huggingface.co/datasets/{data})" if _hub_id(data) else f"`{data}`"
    beta = f", β = {facts['beta']:g}" if "beta" in facts else ""
    if facts["objective"] == "dpo":
        beta += " (the paper code's scale: loss = −log σ(−0.5·β·(Δθ − Δref)))"
    lines = [
        f"# {Path(cfg.output_dir).name}",
        "",
        f"A {facts['fine_tune']} fine-tune of {base_link} by {method}{beta}, trained with diffusion-dpo's "
        "`train_sd.py`.",
        "",
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base_link} |",
        f"| method | {method}{beta} |",
        f"| fine-tune | {facts['fine_tune']} |",
        f"| data | {data_link}, split `{facts['dataset_split']}` |",
        f"| steps | {facts['steps']} optimizer steps, total batch {facts['total_batch_size']}, learning rate "
        f"{facts['learning_rate']:g} ({cfg.lr_scheduler}) |",
        f"| resolution, precision | {facts['resolution']} px, {facts['mixed_precision']} |",
        f"| seed | {facts['seed']} |",
        "",
        "## Results",
        "",
    ]
    if "heldout_implicit_accuracy" in facts:
        lines.append(
            f"- Held-out implicit-reward accuracy: **{facts['heldout_implicit_accuracy']:.2f}** on "
            f"{facts['heldout_pairs']} pairs of `{facts['heldout_dataset']}` (the share of held-out pairs whose "
            "preferred image the model prefers over its reference; 0.5 is chance)."
        )
    else:
        lines.append("- No held-out implicit-reward accuracy (no `--validation_dataset_name`).")
    if evaluation:
        for scorer, wr in evaluation["win_rates"].items():
            lines.append(
                f"- Win rate against `{evaluation['baseline']}` by the `{scorer}` scorer: **{wr['win_rate']:.3f}** "
                f"(95% interval [{wr['ci_low']:.3f}, {wr['ci_high']:.3f}]) over {evaluation['prompts']} prompts "
                f"× {evaluation['seeds']} seeds, from `eval/evaluate.py`: {_verdict(wr, evaluation['baseline'])}."
            )
    else:
        lines.append(
            "- Not yet compared with its base on generated images: `python eval/evaluate.py --model "
            f"base={base} --model tuned={cfg.output_dir} ...` adds the win rate here."
        )
    where = repo_id or str(cfg.output_dir)
    no_t5 = ", text_encoder_3=None, tokenizer_3=None" if cfg.drop_t5 else ""
    if cfg.use_lora:
        load = f'pipe = DiffusionPipeline.from_pretrained("{base}"{no_t5})\npipe.load_lora_weights("{where}")'
    else:
        load = f'pipe = DiffusionPipeline.from_pretrained("{where}"{no_t5})'
    lines += ["", "## How to use", "", "```python", "from diffusers import DiffusionPipeline", "", load]
    prompt = cfg.validation_prompts[0] if cfg.validation_prompts else "a photo of a cat"
    lines += [f"image = pipe({prompt!r}).images[0]", "```", ""]
    samples = sorted((Path(cfg.output_dir) / "samples").glob("*.png"))
    if samples and cfg.validation_prompts:
        lines += [
            "## Samples",
            "",
            f"One image per validation prompt (seed {cfg.seed} + its index, {cfg.num_inference_steps} "
            "sampling steps), from the trained model:",
            "",
        ]
        lines += [f"![{p}](samples/{s.name}) `{p}`" for p, s in zip(cfg.validation_prompts, samples)] + [""]
    return "\n".join(lines)


def _verdict(wr: dict, baseline: str) -> str:
    if wr["ci_low"] > 0.5:
        return "its images are preferred (the whole interval is above 0.5)"
    if wr["ci_high"] < 0.5:
        return f"`{baseline}`'s images are preferred (the whole interval is below 0.5)"
    return "no clear difference (the interval contains 0.5)"


def build_model_card(
    cfg: TrainConfig,
    family_name: str,
    global_step: int,
    *,
    num_processes: int = 1,
    evaluation: dict | None = None,
    repo_id: str | None = None,
):
    """The card of the run ``cfg`` (``family_name``: the model family's ``name``, for its tags)."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    facts = run_facts(cfg, family_name, global_step, num_processes)
    if evaluation:
        facts["evaluation"] = evaluation
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        base_model=_hub_id(cfg.pretrained_model_name_or_path),
        datasets=[_hub_id(cfg.dataset_name)] if _hub_id(cfg.dataset_name) else None,
        diffusion_dpo=facts,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(cfg, facts, evaluation, repo_id)}")
    tags = [*family_tags(family_name), "text-to-image", "diffusers", "diffusers-training", TAG]
    tags.append(facts["objective"])
    if cfg.use_lora:
        tags.append("lora")
    return populate_model_card(card, tags=tags)


def _family_name(cfg: TrainConfig) -> str:
    from diffusion_dpo.models.families import family_for_index
    from diffusion_dpo.models.pretrained import read_model_index

    index = read_model_index(cfg.pretrained_model_name_or_path, cfg.revision)
    return family_for_index(index, cfg.pretrained_model_name_or_path, **cfg.family_options()).name


def write_model_card(
    cfg: TrainConfig,
    global_step: int,
    *,
    family_name: str | None = None,
    num_processes: int | None = None,
    evaluation: dict | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the card to ``output_dir/README.md`` (replacing an earlier one); returns its path."""
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
    card = build_model_card(
        cfg, family_name or _family_name(cfg), global_step, num_processes=num_processes,
        evaluation=evaluation, repo_id=repo_id or (cfg.hub_model_id if cfg.push_to_hub else None),
    )  # fmt: skip
    path = Path(cfg.output_dir) / CARD_FILE
    card.save(path)
    logger.info("wrote the model card %s", path)
    return path


def record_evaluation(model_dir: str | Path, evaluation: dict) -> Path | None:
    """Add an evaluation's win rates to the card of a trainer output at ``model_dir`` (a folder whose
    card this trainer wrote, next to its ``training_config.yaml``); returns the card's path, None for
    any other model (a hub id, a base model, a folder not made here). ``evaluation``: ``baseline``,
    ``prompts``, ``seeds`` and ``win_rates``, ``{scorer: {"win_rate", "ci_low", "ci_high", ...}}``."""
    import yaml
    from huggingface_hub import ModelCard

    folder = Path(str(model_dir))
    card_path, config_path = folder / CARD_FILE, folder / "training_config.yaml"
    if not card_path.is_file() or not config_path.is_file():
        return None
    card = ModelCard.load(card_path)
    facts = card.data.to_dict().get("diffusion_dpo")
    if TAG not in (card.data.tags or []) or not isinstance(facts, dict):
        return None
    saved = yaml.safe_load(config_path.read_text())
    known = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in FIELDS}
    cfg = TrainConfig(**{**known, "output_dir": str(folder)})
    return write_model_card(
        cfg, facts["steps"], family_name=facts["family"], num_processes=facts.get("processes", 1),
        evaluation=evaluation,
    )  # fmt: skip


def record_evaluations(summary: dict, sources: dict[str, str]) -> list[Path]:
    """After ``eval/evaluate.py``: write each evaluated trainer output's win rates against the baseline
    into its card. ``summary``: the evaluation's summary; ``sources``: model name -> its folder or id.
    Returns the cards written."""
    written = []
    for name, by_scorer in summary.get("win_rates", {}).items():
        evaluation = {
            "baseline": summary["baseline"], "prompts": summary["n_prompts"], "seeds": len(summary["seeds"]),
            "win_rates": {
                scorer: {k: wr[k] for k in ("win_rate", "ci_low", "ci_high")}
                for scorer, wr in by_scorer.items() if wr and wr.get("win_rate") is not None
            },
        }  # fmt: skip
        try:
            path = record_evaluation(sources[name], evaluation) if evaluation["win_rates"] else None
        except OSError as err:  # a read-only model folder: the evaluation's own outputs still stand
            logger.warning("could not add the win rate to the model card of %s: %s", sources[name], err)
            path = None
        if path is not None:
            written.append(path)
    return written
