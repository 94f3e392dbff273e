#!/usr/bin/env python
"""Soft labels vs hard labels in the imperfect-winners world, with several annotators per pair.

    python data/soft_label_study.py --output_dir outputs/soft_labels --annotators 5 [--seeds 0 1] [--tune]
        [--quick] [--num_threads 1]

The imperfect world of data/synthetic_experiment.py (both images of a pair usually flawed, noisy
Bradley–Terry annotators as often in agreement as Pick-a-Pic's people) gets K annotators per pair instead
of one. Each annotator prefers image 0 with probability σ((f₀ − f₁)/T), the same model and temperature as
the world's single annotator, and the pair's label is the vote share ``label_0 = votes for image 0 / K``
(written as ``caption, image_0, image_1, label_0``, docs/data.md). From the same base model and the same
votes, two Diffusion-DPO fine-tunes:

- **hard**: the majority wins (``--label_mode hard``; a split vote trains as p = 1, exact ties dropped);
- **soft**: the expected loss under the vote share (``--label_mode soft``; ties kept at 0.5).

Both are evaluated as the main study evaluates (eval/evaluate.py, the ``shapes`` faithfulness scorer on the
held-out prompts). The report gives each one's win rate against the base and soft against hard head to head
on the same (prompt, seed) images, with cluster-bootstrap intervals over prompts, and the intervals pooled
over ``--seeds``. With ``--tune``, each mode's learning rate and β are chosen on the validation prompts
from the same grid (4 trials each, synthetic_experiment.SEARCH["dpo"]), as the main study tunes.
Results: OUTPUT_DIR/soft_labels.json and soft_labels.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusion_dpo import synthetic  # noqa: E402
from diffusion_dpo.synthetic import results  # noqa: E402

MODES = {"hard": (), "soft": ("--label_mode", "soft")}


def _experiment():
    # the main study's stages (data, VAE, base, train_stage, evaluate), imported as a module
    spec = importlib.util.spec_from_file_location(
        "synthetic_experiment", ROOT / "data" / "synthetic_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--annotators", type=int, default=5, help="annotators per pair (K)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tune", action="store_true", help="choose lr and β per mode on validation prompts")
    parser.add_argument("--quick", action="store_true", help="the main study's reduced scale")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="reuse finished stages in OUTPUT_DIR")
    args = parser.parse_args(argv)
    if args.annotators < 2:
        parser.error(
            f"--annotators must be >= 2 (one annotator gives hard labels only), got {args.annotators}"
        )
    return args


def write_vote_shares(pairs_path: Path, out_path: Path, annotators: int, seed: int) -> dict:
    """The imperfect pairs' images relabelled by ``annotators`` independent annotators each: rows
    ``caption, image_0, image_1, label_0`` with ``label_0`` the share of votes for image 0. Returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_path).to_pylist()
    temperature = synthetic.calibrate_temperature(resolution=32)
    rng = np.random.default_rng(seed + 11)
    rows, shares = [], []
    for r in table:
        p_image_0 = 1.0 / (1.0 + np.exp(-(r["faithfulness_0"] - r["faithfulness_1"]) / temperature))
        share = float(rng.binomial(annotators, p_image_0)) / annotators
        shares.append(share)
        rows.append({"caption": r["caption"], "image_0": r["jpg_0"], "image_1": r["jpg_1"], "label_0": share})
    pq.write_table(pa.Table.from_pylist(rows), out_path)
    shares = np.array(shares)
    return {
        "pairs": len(rows), "annotators": annotators, "temperature": temperature,
        "unanimous": int(((shares == 0) | (shares == 1)).sum()), "ties": int((shares == 0.5).sum()),
        "split": int(((shares > 0) & (shares < 1) & (shares != 0.5)).sum()),
    }  # fmt: skip


def run_seed(sx, args, seed: int, out: Path, scale) -> dict:
    names = ["data", "vae", "base", "votes", *(f"dpo_{m}" for m in MODES), "evaluate"]
    stages = sx.Stages(names, out / "stages.json", args.resume)
    ns = argparse.Namespace(world="imperfect", arch="sd15", resume=args.resume, device=args.device)
    data, models = sx.prepare_seed(ns, seed, out, scale, stages)
    votes = out / "data" / "pairs_votes.parquet"
    counts = stages.run(
        "votes", f"{args.annotators} annotators per pair", write_vote_shares, data["pairs"], votes,
        args.annotators, seed,
    )  # fmt: skip
    if counts is None:
        counts = json.loads((out / "votes.json").read_text())
    (out / "votes.json").write_text(json.dumps(counts, indent=2) + "\n")
    hparams = tune(sx, args, seed, out, scale, data, models, votes) if args.tune else {}
    extra = sx._validation_flags(data, scale, "imperfect")
    for mode, flags in MODES.items():
        stages.run(
            f"dpo_{mode}", f"Diffusion-DPO, {mode} labels" + (f" with {hparams[mode]}" if hparams.get(mode) else ""),
            sx.train_stage, "dpo", models["base"], votes, out / "models" / f"dpo_{mode}", scale, seed,
            [*extra, *flags], hparams.get(mode),
        )  # fmt: skip
    eval_dir = out / "eval"
    candidates = {"base": models["base"], **{f"dpo_{m}": out / "models" / f"dpo_{m}" for m in MODES}}
    stages.run("evaluate", "held-out prompts, every model", sx.evaluate, candidates, data, eval_dir, scale, seed,
               args.device)  # fmt: skip
    summary = json.loads((eval_dir / "summary.json").read_text())
    return {
        "seed": seed, "votes": counts, "hparams": hparams,
        "vs_base": {m: summary["win_rates"][f"dpo_{m}"]["shapes"] for m in MODES},
        "mean_score": {name: summary["scores"][name]["shapes"]["mean"] for name in candidates}
        if "scores" in summary else None,
        "soft_vs_hard": results.head_to_head(eval_dir / "scores.csv", "dpo_soft", "dpo_hard"),
        "scores_csv": str(eval_dir / "scores.csv"),
        "seconds": stages.seconds,
    }  # fmt: skip


def tune(sx, args, seed, out, scale, data, models, votes) -> dict:
    """Each mode's lr and β from the same grid, by win rate against the base on the validation prompts."""
    tuning = out / "tuning"
    grid = sx.SEARCH["dpo"]
    trials = [(m, i, hp) for m in MODES for i, hp in enumerate(grid)]
    stages = sx.Stages([f"{m}-{i}" for m, i, _ in trials] + ["evaluate"], tuning / "stages.json", args.resume)
    extra = [*sx._validation_flags(data, scale, "imperfect"), "--validation_steps", "100000"]
    for m, i, hp in trials:
        stages.run(f"{m}-{i}", f"trial {i + 1}/{len(grid)} of {m} labels: {hp}", sx.train_stage, "dpo",
                   models["base"], votes, tuning / f"{m}-{i}", scale, seed, [*extra, *MODES[m]], hp)  # fmt: skip
    candidates = {"base": models["base"], **{f"{m}-{i}": tuning / f"{m}-{i}" for m, i, _ in trials}}
    stages.run("evaluate", "every trial on the validation prompts", sx.evaluate, candidates, data,
               tuning / "eval", scale, seed, args.device, "validation")  # fmt: skip
    summary = json.loads((tuning / "eval" / "summary.json").read_text())
    chosen = {}
    for m in MODES:
        rates = [summary["win_rates"][f"{m}-{i}"]["shapes"]["win_rate"] for i in range(len(grid))]
        chosen[m] = grid[int(np.argmax(rates))]  # ties: the first
    (tuning / "chosen.json").write_text(json.dumps({"chosen": chosen}, indent=2) + "\n")
    return chosen


def _fmt(wr: dict) -> str:
    lo, hi = wr["ci_low"], wr["ci_high"]
    return f"{wr['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    sx = _experiment()
    scale = sx.scale_for("sd15", args.quick)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per_seed = [run_seed(sx, args, s, out / f"seed-{s}", scale) for s in args.seeds]
    csvs = [Path(r["scores_csv"]) for r in per_seed]
    pooled = {
        "soft_vs_hard": results.pooled_head_to_head(csvs, "dpo_soft", "dpo_hard"),
        **{f"{m}_vs_base": results.pooled_head_to_head(csvs, f"dpo_{m}", "base") for m in MODES},
    }
    record = {
        "annotators": args.annotators, "seeds": args.seeds, "quick": args.quick, "tune": args.tune,
        "num_threads": args.num_threads, "per_seed": per_seed, "pooled": pooled,
        "elapsed_s": round(time.time() - t0, 1),
    }  # fmt: skip
    (out / "soft_labels.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Soft vs hard labels, {args.annotators} annotators per pair (imperfect world, seeds {args.seeds}"
        + (", quick" if args.quick else "")
        + (", tuned" if args.tune else ", config hyperparameters")
        + ")",
        "",
        "| comparison | win rate [95% interval] |",
        "|---|---|",
        f"| hard vs base | {_fmt(pooled['hard_vs_base'])} |",
        f"| soft vs base | {_fmt(pooled['soft_vs_base'])} |",
        f"| soft vs hard (head to head) | {_fmt(pooled['soft_vs_hard'])} |",
    ]
    (out / "soft_labels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
