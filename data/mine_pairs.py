"""Mine on-policy preference pairs: sample K images per prompt from a model, score them, pair them.

    python data/mine_pairs.py --model outputs/sd15-dpo --prompts prompts.txt \\
        --scorer pickscore --scorer hpsv2.1 --scorer_weights 1,0.5 \\
        --num_images_per_prompt 8 --pairing best_worst --min_prompt_spread 0.1 \\
        --output mined/round1 --seed 0 --num_inference_steps 50 --resolution 512 \\
        --batch_size 8 --device cuda --dtype fp16
    accelerate launch train_sd.py --config configs/sd15_lora.yaml --dataset_name mined/round1

``--model`` is a diffusers folder, a hub id or a LoRA output folder of ``train_sd.py``. Images come
from the evaluation suite's generator (``diffusion_dpo.evaluation.generate``): image k of every prompt
starts from seed ``SEED + k``, and images and scores are cached under ``--cache_dir`` (default
``OUTPUT/cache``), so a rerun (say, with another ``--pairing`` or ``--min_margin``) generates and scores
nothing again; share the folder with ``eval/evaluate.py`` and each reuses the other's images.

Writes ``OUTPUT/train.parquet`` in Pick-a-Pic v2's columns (``caption, jpg_0, jpg_1, label_0,
label_1``; the chosen image at a seeded random position) plus ``score_0``/``score_1`` (the combined
score), ``score_<scorer>_0``/``_1`` per scorer, ``seed_0``/``seed_1`` and ``prompt_index`` (the
prompt's row in ``--prompts``), and ``OUTPUT/mining.json`` (settings and counts). The selection rules
are in ``diffusion_dpo/curation/mining.py``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffusion_dpo.curation import mining
from diffusion_dpo.evaluation.cli import run_script
from diffusion_dpo.evaluation.generate import DTYPES, ModelLoadError, generate_images, resolve_model
from diffusion_dpo.evaluation.prompts import load_prompts
from diffusion_dpo.evaluation.score_cache import ScoreCache, score_files, score_key, scorer_if_needed

logger = logging.getLogger("mine_pairs")


class MiningError(Exception):
    """A fault found after the arguments were checked: one ``error:`` line and exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers folder, hub id or LoRA output folder")
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file (.txt/.csv/.tsv/.jsonl/.json/.parquet), dataset folder, hub dataset id or "
        "hpsv2[:STYLE] (as eval/evaluate.py)",
    )
    p.add_argument("--prompt_column", default=None, help="prompt column (default: prompt/caption/Prompt)")
    p.add_argument("--prompt_split", default="train", help="split of a hub/disk dataset of prompts")
    p.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument(
        "--scorer",
        action="append",
        required=True,
        metavar="NAME[=PATH_OR_ID]",
        help="pickscore, hpsv2.0, hpsv2.1, clip_score, aesthetic, image_reward, shapes (repeat to combine)",
    )
    p.add_argument(
        "--scorer_weights", default=None, metavar="W1,W2,...", help="one weight per --scorer (default all 1)"
    )
    p.add_argument(
        "--score_normalization",
        choices=mining.NORMALIZATIONS,
        default="auto",
        help="before weighting: auto = raw for one scorer, z-scores over all images for several",
    )
    p.add_argument("--scorer_batch_size", type=int, default=16)
    p.add_argument("--scorer_dtype", choices=list(DTYPES), default="fp32", help="scorer backbone dtype")
    p.add_argument("--num_images_per_prompt", type=int, required=True, help="K samples per prompt (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed SEED + k")
    p.add_argument(
        "--pairing",
        choices=mining.PAIRINGS,
        default="best_worst",
        help="best_worst: the best against the worst image of each prompt; all: every two images "
        "whose combined scores differ by at least --min_margin",
    )
    p.add_argument(
        "--min_margin",
        type=float,
        default=0.0,
        help="least combined-score difference of a pair (ties never pair)",
    )
    p.add_argument(
        "--pairs_per_prompt", type=int, default=None, help="at most N pairs per prompt, the largest margins"
    )
    p.add_argument(
        "--min_prompt_spread",
        type=float,
        default=0.0,
        help="drop prompts whose K combined scores span less than this (max - min)",
    )
    p.add_argument("--output", required=True, help="dataset folder: train.parquet and mining.json")
    mining.add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Mine pairs; returns ``{"output", "dataset_file", "manifest", "num_pairs", "num_prompts",
    "num_images", "prompts_dropped", "prompts_without_pairs", "mean_margin", "mean_chosen_score",
    "mean_rejected_score", "images_generated", "scores_computed"}``. ``output`` is the folder to pass
    to ``train_sd.py --dataset_name``; without pairs no ``train.parquet`` is written (``dataset_file``
    None, the means NaN).

    Bad arguments exit with usage and status 2; a fault found later (missing scorer weights, a model
    that does not load, a NaN score) with one ``error:`` line and status 1. Work done before the fault
    stays cached for the rerun.
    """
    return run_script(build_parser(), argv, _run, (MiningError, ModelLoadError))


def _check_arguments(args) -> None:
    """Every check that costs nothing, before any model, scorer or prompt is loaded (ValueError)."""
    if args.num_images_per_prompt < 2:
        raise ValueError(
            f"--num_images_per_prompt must be >= 2 to make pairs, got {args.num_images_per_prompt}"
        )
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.min_margin < 0 or args.min_prompt_spread < 0:
        raise ValueError("--min_margin and --min_prompt_spread must be >= 0")
    if args.pairs_per_prompt is not None and args.pairs_per_prompt < 1:
        raise ValueError(f"--pairs_per_prompt must be >= 1, got {args.pairs_per_prompt}")
    if args.scorer_batch_size < 1:
        raise ValueError(f"--scorer_batch_size must be >= 1, got {args.scorer_batch_size}")


def _check_scorers(specs: list[str]) -> None:
    # Before any image is generated: a typo or missing weights found after an hour of sampling costs an hour.
    from diffusion_dpo.scorers import missing_scorer_weights

    missing = missing_scorer_weights(specs)
    if missing:
        raise MiningError("\n".join(missing))


def _unique(prompts: list[str]) -> tuple[list[str], list[int]]:
    # A repeated prompt would give the same images and so the same pairs twice, weighting it double.
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        seen.setdefault(prompt, i)
    return list(seen), list(seen.values())


def _score(args, prompts: list[str], seeds: list[int], paths, cache_dir: Path):
    """One ``[P, K]`` array per ``--scorer`` and how many scores were computed now (the rest cached).

    A scorer is loaded only when one of its scores is missing from its cache.
    """
    flat_prompts = [prompt for prompt in prompts for _ in seeds]  # prompt-major, as paths
    flat_paths = [path for row in paths for path in row]
    keys = [score_key(path, prompt) for path, prompt in zip(flat_paths, flat_prompts)]
    out, n_scored = [], 0
    for spec in args.scorer:
        cache = ScoreCache.for_scorer(cache_dir / "scores", spec, args.scorer_dtype)
        scorer = scorer_if_needed(
            spec, any(key not in cache for key in keys), device=args.device, dtype=DTYPES[args.scorer_dtype],
            batch_size=args.scorer_batch_size, error=MiningError,
        )  # fmt: skip
        values, n_new = score_files(
            scorer, flat_paths, flat_prompts, keys, cache, chunk_size=4 * args.scorer_batch_size
        )
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise MiningError(
                f"scorer {spec} gave NaN or infinite scores for {bad.size} of {values.size} images (first: "
                f"{flat_paths[bad[0]]}); with --scorer_dtype fp16/bf16 try fp32. Finite scores are cached."
            )
        logger.info(
            "scorer %s: %d scores computed, %d cached in %s", spec, n_new, values.size - n_new, cache.path
        )
        out.append(values.reshape(len(prompts), len(seeds)))  # [P, K]
        n_scored += n_new
        del scorer
    return out, n_scored


def _rows(mined, prompts, indices, seeds, paths, combined, per_scorer, columns, seed):
    """Pick-a-Pic rows of the mined pairs, one at a time (image bytes are read as they are written)."""
    for p, c, r in mined.pairs:
        first, second = (c, r) if mining.chosen_first(seed, indices[p], c, r) else (r, c)
        row = {
            "caption": prompts[p],
            "jpg_0": paths[p][first].read_bytes(),  # the cached PNG as generated, not re-encoded
            "jpg_1": paths[p][second].read_bytes(),
            "label_0": 1.0 if first == c else 0.0,
            "label_1": 0.0 if first == c else 1.0,
            "score_0": float(combined[p, first]),
            "score_1": float(combined[p, second]),
        }
        for column, scores in zip(columns, per_scorer):
            row[f"{column}_0"], row[f"{column}_1"] = float(scores[p, first]), float(scores[p, second])
        row.update(seed_0=seeds[first], seed_1=seeds[second], prompt_index=indices[p])
        yield row


def _run(parser: argparse.ArgumentParser, args) -> dict:
    import pyarrow as pa

    from diffusion_dpo.scorers import parse_spec

    try:
        _check_arguments(args)
        weights = mining.parse_weights(args.scorer_weights, len(args.scorer))
        spec = resolve_model("model", args.model)
        settings = mining.generation_settings(args)
        prompt_set = load_prompts(
            args.prompts,
            prompt_column=args.prompt_column,
            split=args.prompt_split,
            max_prompts=args.max_prompts,
        )
        _check_scorers(args.scorer)  # after the cheap checks: this may download weights
    except ValueError as err:
        parser.error(str(err))

    t0 = time.time()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    prompts, indices = _unique(prompt_set.prompts)
    if len(prompts) < len(prompt_set):
        logger.info("%d repeated prompts left out (each is mined once)", len(prompt_set) - len(prompts))
    seeds = [args.seed + k for k in range(args.num_images_per_prompt)]

    paths, n_generated = generate_images(
        spec, prompts, seeds, settings, cache_dir,
        device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    per_scorer, n_scored = _score(args, prompts, seeds, paths, cache_dir)
    combined, norm = mining.combine_scores(per_scorer, weights, args.score_normalization)
    mined = mining.mine(
        combined, args.pairing, args.min_margin, args.pairs_per_prompt, args.min_prompt_spread
    )

    columns = mining.score_columns([parse_spec(s)[0] for s in args.scorer])
    extra = [("score_0", pa.float64()), ("score_1", pa.float64())]
    extra += [(f"{c}_{i}", pa.float64()) for c in columns for i in (0, 1)]
    extra += [("seed_0", pa.int64()), ("seed_1", pa.int64()), ("prompt_index", pa.int64())]
    rows = _rows(mined, prompts, indices, seeds, paths, combined, per_scorer, columns, args.seed)
    if mined.pairs:
        dataset_file = mining.write_pairs(output, rows, extra)
    else:
        # No file rather than an empty one: datasets cannot load a parquet file of 0 rows, and a
        # stale file of an earlier run must not be trained on as if it were this one's.
        dataset_file = None
        (output / mining.PAIRS_FILE).unlink(missing_ok=True)
        logger.warning("no pairs: no %s written in %s", mining.PAIRS_FILE, output)

    chosen = np.array([combined[p, c] for p, c, _ in mined.pairs])
    rejected = np.array([combined[p, r] for p, _, r in mined.pairs])
    counts = {
        "prompts": len(prompts),
        "repeated_prompts_left_out": len(prompt_set) - len(prompts),
        "images": len(prompts) * len(seeds),
        "images_generated": n_generated,
        "scores_computed": n_scored,
        "prompts_dropped": len(mined.dropped),
        "prompts_without_pairs": len(mined.unpaired),
        "pairs": len(mined.pairs),
        "mean_margin": _mean(chosen - rejected),
        "mean_chosen_score": _mean(chosen),
        "mean_rejected_score": _mean(rejected),
    }
    manifest = {
        "kind": "on_policy",
        "model": {"source": spec.source, "kind": spec.kind, "base": spec.base},
        "prompts": {"source": args.prompts, "split": args.prompt_split, "column": args.prompt_column,
                    "max_prompts": args.max_prompts},
        "scorers": [
            {"spec": s, "columns": [f"{c}_0", f"{c}_1"], "weight": w, **n}
            for s, c, w, n in zip(args.scorer, columns, weights, norm)
        ],
        "score_normalization": args.score_normalization,
        "selection": {"pairing": args.pairing, "min_margin": args.min_margin,
                      "pairs_per_prompt": args.pairs_per_prompt, "min_prompt_spread": args.min_prompt_spread},
        "num_images_per_prompt": args.num_images_per_prompt,
        "seeds": seeds,
        "generation": asdict(settings),
        "device": args.device,
        "scorer_dtype": args.scorer_dtype,
        "cache_dir": str(cache_dir),
        "counts": counts,
        "dataset_file": str(dataset_file) if dataset_file else None,
        "elapsed_s": round(time.time() - t0, 2),
    }  # fmt: skip
    manifest_file = mining.write_manifest(output, manifest)
    print(_summary(counts, args, dataset_file))
    return {
        "output": str(output),
        "dataset_file": str(dataset_file) if dataset_file else None,
        "manifest": str(manifest_file),
        "num_pairs": counts["pairs"],
        "num_prompts": counts["prompts"],
        "num_images": counts["images"],
        "prompts_dropped": counts["prompts_dropped"],
        "prompts_without_pairs": counts["prompts_without_pairs"],
        "mean_margin": counts["mean_margin"],
        "mean_chosen_score": counts["mean_chosen_score"],
        "mean_rejected_score": counts["mean_rejected_score"],
        "images_generated": n_generated,
        "scores_computed": n_scored,
    }


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _summary(counts: dict, args, dataset_file: Path | None) -> str:
    lines = [
        f"mined {counts['pairs']} pairs ({args.pairing}) from {counts['prompts']} prompts x "
        f"{args.num_images_per_prompt} images -> {dataset_file or 'nothing written'}",
        f"  images: {counts['images_generated']} generated now, {counts['images'] - counts['images_generated']} "
        f"cached; scores: {counts['scores_computed']} computed now",
        f"  prompts dropped by --min_prompt_spread {args.min_prompt_spread}: {counts['prompts_dropped']}; "
        f"without a pair at --min_margin {args.min_margin}: {counts['prompts_without_pairs']}",
    ]
    if counts["pairs"]:
        lines.append(
            f"  combined score: chosen {counts['mean_chosen_score']:.4g}, rejected "
            f"{counts['mean_rejected_score']:.4g}, mean margin {counts['mean_margin']:.4g}"
        )
    else:
        lines.append(
            "  no pairs: lower --min_margin or --min_prompt_spread, or sample more images per prompt"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
