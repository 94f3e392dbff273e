"""Compare text-to-image checkpoints on a prompt set with automatic preference scorers.

    python eval/evaluate.py \\
        --model base=runwayml/stable-diffusion-v1-5 --model dpo=outputs/sd15-dpo \\
        --prompts nateraw/parti-prompts --scorer pickscore --scorer hpsv2.1 \\
        --output_dir eval_out/parti --num_images_per_prompt 4 --seed 0 \\
        --num_inference_steps 50 --guidance_scale 7.5 --resolution 512 --batch_size 8 \\
        --device cuda --dtype fp16

The first ``--model`` is the baseline. Every model renders every (prompt, seed) from the same seeded
noise; images are cached under ``--cache_dir`` (default ``OUTPUT_DIR/images``) so a rerun only adds
what is missing. Writes ``summary.json``, ``scores.csv``, ``report.html`` and ``plots/`` to
``--output_dir`` and prints a table of mean ± sem and win rate [95% CI] per model and scorer.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from diffusion_dpo.evaluation.generate import DTYPES, GenerationSettings, generate_images, parse_model_spec
from diffusion_dpo.evaluation.prompts import load_prompts
from diffusion_dpo.evaluation.report import EvalResults, summarize_results, write_report

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
        help="pickscore, hpsv2.0, hpsv2.1, clip_score, aesthetic, image_reward, shapes (repeat)",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--cache_dir", default=None, help="image cache (default OUTPUT_DIR/images); share it between runs"
    )
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="N images per prompt: seeds S..S+N-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
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


def score_image_files(scorer, paths, prompts, chunk_size: int = 64) -> np.ndarray:
    """Score image files ``[N]`` with their prompts ``[N]``; images are opened ``chunk_size`` at a time."""
    from PIL import Image

    out = []
    for start in range(0, len(paths), chunk_size):
        images = []
        for path in paths[start : start + chunk_size]:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        scores = scorer(images, list(prompts[start : start + chunk_size]))
        out.append(np.asarray(scores.detach().float().cpu(), dtype=np.float64).reshape(-1))
    scores = np.concatenate(out)
    if scores.shape[0] != len(paths):
        raise RuntimeError(f"scorer returned {scores.shape[0]} scores for {len(paths)} images")
    return scores


def _check_scorer_specs(specs: list[str]) -> None:
    # Fail before hours of generation on a typo; loading happens after generation (GPU memory).
    from diffusion_dpo.scorers import SCORERS, parse_spec

    for spec in specs:
        name, _ = parse_spec(spec)
        if name not in SCORERS:
            raise ValueError(f"--scorer {spec!r}: unknown scorer {name!r}; choose from {', '.join(SCORERS)}")


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


def format_table(summary: dict) -> str:
    """The short end-of-run table: model, scorer, mean ± sem, win rate [95% CI]."""
    rows = [("model", "scorer", "mean ± sem", "win rate vs " + summary["baseline"] + " [95% CI]")]
    for m in summary["models"]:
        for s in summary["scorers"]:
            st = summary["scores"][m][s]
            sem = "nan" if not np.isfinite(st["sem"]) else f"{st['sem']:.4g}"
            wr = summary["win_rates"].get(m, {}).get(s)
            wr_txt = f"{wr['win_rate']:.3f} [{wr['ci_low']:.3f}, {wr['ci_high']:.3f}]" if wr else "(baseline)"
            rows.append((m, s, f"{st['mean']:.4g} ± {sem}", wr_txt))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the summary dict (also written to ``OUTPUT_DIR/summary.json``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        models = [parse_model_spec(spec) for spec in args.model]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"--model names must be unique, got {names}")
        _check_scorer_specs(args.scorer)
        if args.num_images_per_prompt < 1:
            raise ValueError(f"--num_images_per_prompt must be >= 1, got {args.num_images_per_prompt}")
        settings = GenerationSettings(
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            resolution=args.resolution,
            negative_prompt=args.negative_prompt,
            dtype=args.dtype,
            device_type=args.device.split(":")[0],
        )
        prompt_set = load_prompts(
            args.prompts,
            prompt_column=args.prompt_column,
            category_column=args.category_column,
            split=args.prompt_split,
            max_prompts=args.max_prompts,
        )
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

    from diffusion_dpo.scorers import load_scorer

    scores: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in models}
    scorer_names: list[str] = []
    flat_prompts = [p for p in prompts for _ in seeds]  # [P*S], prompt-major like paths
    for spec in args.scorer:
        try:
            scorer = load_scorer(
                spec, device=args.device, dtype=DTYPES[args.scorer_dtype], batch_size=args.scorer_batch_size
            )
        except (ValueError, FileNotFoundError) as err:  # incl. MissingWeightsError
            parser.error(f"--scorer {spec!r}: {err}")
        name = scorer.name if scorer.name not in scorer_names else f"{scorer.name}#{len(scorer_names)}"
        scorer_names.append(name)
        for m in models:
            flat_paths = [path for row in image_paths[m.name] for path in row]
            values = score_image_files(
                scorer, flat_paths, flat_prompts, chunk_size=4 * args.scorer_batch_size
            )
            scores[m.name][name] = values.reshape(len(prompts), len(seeds))  # [P, S]
        del scorer

    implicit = _implicit_accuracy(args, models) if args.implicit_pairs and len(models) > 1 else None

    settings_record = {
        "prompts": args.prompts,
        "prompt_split": args.prompt_split,
        "max_prompts": args.max_prompts,
        "num_images_per_prompt": args.num_images_per_prompt,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
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
    summary["elapsed_s"] = round(time.time() - t0, 2)
    paths = write_report(
        results, summary, output_dir, top_k=args.top_k, max_grid_prompts=args.max_grid_prompts
    )
    print(format_table(summary))
    print(f"\nreport: {paths['html']}\nsummary: {paths['summary']}\nper-image scores: {paths['csv']}")
    return summary


if __name__ == "__main__":
    main()
