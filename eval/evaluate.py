"""Compare text-to-image checkpoints on a prompt set with automatic preference scorers.

    python eval/evaluate.py \\
        --model base=runwayml/stable-diffusion-v1-5 --model dpo=outputs/sd15-dpo \\
        --prompts nateraw/parti-prompts --scorer pickscore --scorer hpsv2.1 \\
        --output_dir eval_out/parti --num_images_per_prompt 4 --seed 0 \\
        --num_inference_steps 50 --guidance_scale 7.5 --resolution 512 --batch_size 8 \\
        --device cuda --dtype fp16

The first ``--model`` is the baseline. Every model renders every (prompt, seed) from the same seeded
noise. Images are cached under ``--cache_dir`` (default ``OUTPUT_DIR/images``) and per-image scores
under ``CACHE_DIR/scores``, so a rerun, or a run resumed after a crash or a kill, only generates and
scores what is missing (the log says how much was reused). Every scorer's weights are checked before
the first image is generated. Writes ``summary.json``, ``scores.csv``, ``report.html`` and ``plots/``
to ``--output_dir`` and prints a table of mean ± sem and win rate [95% CI] per model and scorer.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from diffusion_dpo.data.removed import check_not_removed
from diffusion_dpo.evaluation.cli import run_script
from diffusion_dpo.evaluation.generate import (
    DTYPES,
    ModelLoadError,
    generate_images,
    parse_model_spec,
    recorded_sampling,
    settings_from_args,
)
from diffusion_dpo.evaluation.prompts import load_prompts
from diffusion_dpo.evaluation.report import (
    EvalResults,
    disagreement_notes,
    format_number,
    summarize_results,
    write_report,
)
from diffusion_dpo.evaluation.score_cache import ScoreCache, score_files, score_key, scorer_if_needed
from diffusion_dpo.training.model_card import record_evaluations

logger = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH_OR_ID",
        help="model to evaluate (repeat); a diffusers folder, a hub id or a LoRA output folder. "
        "The first is the baseline.",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.txt/.csv/.tsv/.jsonl/.json/.parquet), "
        "dataset folder, hub dataset id, or hpsv2[:STYLE]",
    )
    p.add_argument("--prompt_column", default=None, help="prompt column (default: prompt/caption/Prompt)")
    p.add_argument(
        "--category_column", default=None, help="category column (default: category/Category if present)"
    )
    p.add_argument("--prompt_split", default="train", help="split of a hub/disk dataset of prompts")
    p.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="NAME[=PATH_OR_ID]",
        help="pickscore, hpsv2.0, hpsv2.1, clip_score, aesthetic, image_reward, shapes, shapes_color_area (repeat)",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--cache_dir", default=None, help="image cache (default OUTPUT_DIR/images); share it between runs"
    )
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="N images per prompt: seeds S..S+N-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="sampler steps (default: what the trained models recorded in training_config.yaml, else 50)",
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: what the trained models recorded, else 7.5)",
    )
    p.add_argument("--resolution", type=int, default=None, help="square output size (default: the model's)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--scorer_batch_size", type=int, default=16)
    p.add_argument("--scorer_dtype", choices=list(DTYPES), default="fp32", help="scorer backbone dtype")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="pipeline weights dtype")
    p.add_argument("--n_bootstrap", type=int, default=2000, help="bootstrap resamples for win-rate intervals")
    p.add_argument(
        "--implicit_pairs",
        default=None,
        metavar="DATASET",
        help="held-out preference pairs: report each model's implicit reward accuracy vs the baseline",
    )
    p.add_argument("--implicit_max_pairs", type=int, default=200)
    p.add_argument("--top_k", type=int, default=5, help="best/worst prompts shown per model and scorer")
    p.add_argument("--max_grid_prompts", type=int, default=16, help="prompts in the side-by-side grid")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class EvaluationError(Exception):
    """A fault that ends the run with one line on stderr and exit status 1 (no traceback)."""


def _check_scorers(specs: list[str]) -> None:
    """Fail before hours of generation on a typo or missing weights (loading waits for GPU memory).

    Raises ValueError for a malformed spec, EvaluationError naming every scorer whose files are missing.
    """
    from diffusion_dpo.scorers import missing_scorer_weights

    missing = missing_scorer_weights(specs)
    if missing:
        raise EvaluationError("\n".join(missing))  # one line per scorer


def _score_all(args, models, prompts, seeds, image_paths, cache_dir: Path):
    """Scores ``{model: {scorer: [P, S]}}``, the scorer names and how many scores were reused.

    A scorer is loaded only if one of its scores is not cached; a NaN or infinite score stops the run
    (summaries of NaN are meaningless) after the finite ones are cached.
    """
    from diffusion_dpo.scorers import parse_spec

    flat_prompts = [p for p in prompts for _ in seeds]  # [P*S], prompt-major like paths
    flat_paths = {name: [path for row in rows for path in row] for name, rows in image_paths.items()}
    # One read of every image file, shared by all scorers: the key hashes its bytes and prompt.
    keys = {m: [score_key(p, q) for p, q in zip(paths, flat_prompts)] for m, paths in flat_paths.items()}
    n_all = sum(len(ks) for ks in keys.values())
    scores: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in models}
    names: list[str] = []
    reuse: dict[str, dict[str, dict[str, int]]] = {}
    for spec in args.scorer:
        name = parse_spec(spec)[0]
        name = name if name not in names else f"{name}#{len(names)}"
        names.append(name)
        cache = ScoreCache.for_scorer(cache_dir / "scores", spec, args.scorer_dtype)
        n_todo = len({k for ks in keys.values() for k in ks if k not in cache})
        logger.info("scorer %s: %d of %d scores cached in %s", name, n_all - n_todo, n_all, cache.path)
        scorer = scorer_if_needed(
            spec, n_todo > 0, device=args.device, dtype=DTYPES[args.scorer_dtype],
            batch_size=args.scorer_batch_size, error=EvaluationError,
        )  # fmt: skip
        reuse[name] = {}
        for m in models:
            values, n_new = score_files(
                scorer,
                flat_paths[m.name],
                flat_prompts,
                keys[m.name],
                cache,
                chunk_size=4 * args.scorer_batch_size,
            )
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise EvaluationError(
                    f"scorer {name} gave NaN or infinite scores for {bad.size} of {values.size} images of "
                    f"model {m.name} (first: {flat_paths[m.name][bad[0]]}). With --scorer_dtype fp16/bf16 "
                    "this is usually an overflow: try fp32. Finite scores are cached, NaN ones are scored "
                    "again on a rerun."
                )
            scores[m.name][name] = values.reshape(len(prompts), len(seeds))  # [P, S]
            reuse[name][m.name] = {"scored": n_new, "cached": values.size - n_new}
        del scorer
    return scores, names, reuse


def _implicit_accuracy(args, models) -> dict[str, float]:
    from diffusion_dpo.training.validation import heldout_implicit_accuracy

    base = models[0]
    reference = base.source if base.kind != "lora" else base.base
    out = {}
    for m in models[1:]:
        out[m.name] = float(
            heldout_implicit_accuracy(
                m.source,
                args.implicit_pairs,
                reference=reference,
                resolution=args.resolution,
                max_pairs=args.implicit_max_pairs,
                seed=args.seed,
                device=args.device,
                batch_size=args.batch_size,
            )
        )
        logger.info("implicit reward accuracy of %s on %s: %.4f", m.name, args.implicit_pairs, out[m.name])
    return out


#: Sampling when neither the command line nor a trained model says (diffusers' SD defaults).
SAMPLING_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.5}


def _sampling_defaults(args, models) -> str:
    """Fill in ``--num_inference_steps``/``--guidance_scale`` left unset, from what the trained models
    recorded (:func:`recorded_sampling`); returns where the values came from, in words."""
    given = {k: getattr(args, k) for k in SAMPLING_DEFAULTS if getattr(args, k) is not None}
    if len(given) == len(SAMPLING_DEFAULTS):
        return "as given on the command line"
    found, where = recorded_sampling(models, SAMPLING_DEFAULTS)
    parts = [f"{key} {value} as given" for key, value in given.items()]
    for key, value in found.items():
        if key not in given:
            setattr(args, key, value)
            parts.append(where[key])
    text = "; ".join(parts)
    logger.info("sampling with %s", text)
    return text


def distinct_prompts(prompt_set):
    """The prompt set with repeats dropped (the first kept, with its category), logged: a repeated
    prompt renders the same images from the same seeds, so it would count one comparison twice."""
    from diffusion_dpo.evaluation.prompts import PromptSet

    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompt_set.prompts):
        seen.setdefault(prompt, i)
    if len(seen) == len(prompt_set.prompts):
        return prompt_set
    keep = sorted(seen.values())
    logger.warning(
        "%d of the %d prompts repeat an earlier one: evaluating the %d distinct prompts",
        len(prompt_set.prompts) - len(keep), len(prompt_set.prompts), len(keep),
    )  # fmt: skip
    cats = [prompt_set.categories[i] for i in keep] if prompt_set.categories is not None else None
    return PromptSet([prompt_set.prompts[i] for i in keep], cats, prompt_set.source)


def format_table(summary: dict) -> str:
    """The short end-of-run table: model, scorer, mean ± sem, win rate [95% CI]."""
    rows = [("model", "scorer", "mean ± sem", "win rate vs " + summary["baseline"] + " [95% CI]")]
    for m in summary["models"]:
        for s in summary["scorers"]:
            st = summary["scores"][m][s]
            wr = summary["win_rates"].get(m, {}).get(s)
            wr_txt = (
                f"{format_number(wr['win_rate'])} [{format_number(wr['ci_low'])}, {format_number(wr['ci_high'])}]"
                if wr
                else "(baseline)"
            )
            rows.append((m, s, f"{format_number(st['mean'])} ± {format_number(st['sem'])}", wr_txt))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the summary dict (also written to ``OUTPUT_DIR/summary.json``).

    Bad arguments exit with usage and status 2; a fault found later (missing scorer weights, a model
    that does not load, a NaN score) exits with one ``error:`` line and status 1. Work done before
    the fault stays cached for the rerun.
    """
    return run_script(build_parser(), argv, _run, (EvaluationError, ModelLoadError))


def _run(parser: argparse.ArgumentParser, args) -> dict:
    try:
        check_not_removed(args.prompts, flag="--prompts")
        check_not_removed(args.implicit_pairs, flag="--implicit_pairs")
        models = [parse_model_spec(spec) for spec in args.model]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"--model names must be unique, got {names}")
        if args.num_images_per_prompt < 1:
            raise ValueError(f"--num_images_per_prompt must be >= 1, got {args.num_images_per_prompt}")
        sampling_from = _sampling_defaults(args, models)
        settings = settings_from_args(args)
        prompt_set = distinct_prompts(
            load_prompts(
                args.prompts,
                prompt_column=args.prompt_column,
                category_column=args.category_column,
                split=args.prompt_split,
                max_prompts=args.max_prompts,
            )
        )
        _check_scorers(args.scorer)  # after the cheap checks: this may download weights
    except ValueError as err:
        parser.error(str(err))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "images"
    seeds = [args.seed + i for i in range(args.num_images_per_prompt)]
    prompts = prompt_set.prompts

    t0 = time.time()
    image_paths, generation = {}, {}
    for m in models:
        paths, n_new = generate_images(
            m,
            prompts,
            seeds,
            settings,
            cache_dir,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        image_paths[m.name] = paths
        generation[m.name] = {"generated": n_new, "cached": len(prompts) * len(seeds) - n_new}

    scores, scorer_names, scoring = _score_all(args, models, prompts, seeds, image_paths, cache_dir)

    implicit = _implicit_accuracy(args, models) if args.implicit_pairs and len(models) > 1 else None

    settings_record = {
        "prompts": args.prompts,
        "prompt_split": args.prompt_split,
        "max_prompts": args.max_prompts,
        "num_images_per_prompt": args.num_images_per_prompt,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "sampling_from": sampling_from,
        "resolution": args.resolution,
        "negative_prompt": args.negative_prompt,
        "dtype": args.dtype,
        "device": args.device,
        "batch_size": args.batch_size,
        "scorer_specs": args.scorer,
        "scorer_dtype": args.scorer_dtype,
        "n_bootstrap": args.n_bootstrap,
        "implicit_pairs": args.implicit_pairs,
        "cache_dir": str(cache_dir),
        "model_specs": {m.name: {"source": m.source, "kind": m.kind, "base": m.base} for m in models},
    }
    results = EvalResults(
        models=names,
        scorers=scorer_names,
        prompts=prompts,
        seeds=seeds,
        scores=scores,
        image_paths=image_paths,
        categories=prompt_set.categories,
        settings=settings_record,
        implicit_accuracy=implicit,
    )
    summary = summarize_results(results, n_boot=args.n_bootstrap, seed=args.seed)
    summary["generation"] = generation
    summary["scoring"] = scoring
    summary["elapsed_s"] = round(time.time() - t0, 2)
    paths = write_report(
        results, summary, output_dir, top_k=args.top_k, max_grid_prompts=args.max_grid_prompts
    )
    print(format_table(summary))
    for note in disagreement_notes(summary):
        print("\nnote: " + note)
    print(f"\nreport: {paths['html']}\nsummary: {paths['summary']}\nper-image scores: {paths['csv']}")
    for card in record_evaluations(summary, {m.name: m.source for m in models}):  # trainer outputs
        print(f"model card with the win rate: {card}")
    return summary


if __name__ == "__main__":
    main()
