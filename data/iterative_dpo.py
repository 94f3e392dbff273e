#!/usr/bin/env python
"""Iterative (on-policy) Diffusion-DPO: R rounds of mine → train → evaluate, no human labels.

    python data/iterative_dpo.py                                   # 2 rounds on the tiny shapes world
    python data/iterative_dpo.py --mining_scorer shapes_color_area --output_dir outputs/iterative_hacked

Round r samples K images per prompt from the model of round r−1 (round 0: ``--model``), scores them with
the mining scorer(s), keeps best-vs-worst pairs (``data/mine_pairs.py``), trains Diffusion-DPO on them
from that model, which is also the round's frozen reference (``train_sd.py --config --train_config``),
and evaluates every model so far on held-out prompts with the mining scorer(s) *and* the held-out
scorer(s) (``eval/evaluate.py``, the same seeds for every model). The table printed after each round
shows both: while they rise together the rounds are learning what the held-out scorer also values;
when the mining score keeps rising and the held-out score stalls or falls, the rounds are gaming the
mining scorer (reward hacking) and it is time to stop or change it.

Defaults run the synthetic shapes world: the synthetic experiment's pretrained base
(``outputs/synthetic/models/base``, built if missing), the world's training prompts to mine on and its
held-out prompts to evaluate on, the programmatic ``shapes`` scorer for both. For Stable Diffusion,
pass ``--model``, ``--prompts``, ``--heldout_prompts``, real scorers (e.g. ``--mining_scorer pickscore
--heldout_scorer hpsv2.1``) and a ``--train_config`` (``configs/sd15_dpo.yaml``). Rounds chain full
fine-tunes or LoRA runs: a full fine-tune's output folder is the pipeline the next round loads; a
LoRA round's adapters are fused into the model it trained on and saved as ``round_R/model/merged``. Finished rounds
are reused on a rerun (images and scores are cached as well), so an interrupted study continues.

Writes ``OUTPUT_DIR/results.json`` and ``results.md`` (the table), ``round_R/pairs`` (the mined
dataset, with its ``mining.json``), ``round_R/model`` (the trained pipeline) and ``eval/`` (the
evaluation suite's report of the last round).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

#: the synthetic experiment's pretrained base (``data/synthetic_experiment.py --output_dir outputs/synthetic``)
SYNTHETIC_OUT = Path("outputs/synthetic")
SYNTHETIC_BASE = SYNTHETIC_OUT / "models" / "base"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=str(SYNTHETIC_BASE),
        help="model of round 0 (diffusers folder or hub id); the default, the synthetic experiment's "
        "pretrained base, is built by that experiment's first stages if missing (about 5 min on 2 cores)",
    )  # fmt: skip
    p.add_argument(
        "--prompts", default=None, help="prompts to mine on (default: the shapes world's training prompts)"
    )
    p.add_argument(
        "--heldout_prompts", default=None,
        help="prompts to evaluate on, never mined (default: the shapes world's held-out prompts)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--mining_scorer", action="append", default=None, metavar="NAME[=PATH]",
        help="scorer(s) that pick chosen and rejected images (repeat; default shapes)",
    )  # fmt: skip
    p.add_argument("--scorer_weights", default=None, help="weights of the mining scorers, comma-separated")
    p.add_argument(
        "--heldout_scorer", action="append", default=None, metavar="NAME[=PATH]",
        help="scorer(s) reported beside the mining scorer(s), never used for mining (repeat; default shapes)",
    )  # fmt: skip
    mine = p.add_argument_group("mining (data/mine_pairs.py flags of the same names)")
    mine.add_argument("--num_images_per_prompt", type=int, default=16)
    mine.add_argument("--pairing", choices=("best_worst", "all"), default="all")
    mine.add_argument("--min_margin", type=float, default=0.1, help="in the (combined) mining score's units")
    mine.add_argument("--pairs_per_prompt", type=int, default=8)
    mine.add_argument("--min_prompt_spread", type=float, default=0.0)
    train = p.add_argument_group("training")
    train.add_argument("--train_config", default=str(ROOT / "configs" / "iterative_dpo.yaml"))
    train.add_argument(
        "--train_arg", action="append", default=[], metavar="KEY=VALUE",
        help="override a train_sd.py setting of every round, e.g. beta_dpo=100 (repeat)",
    )  # fmt: skip
    gen = p.add_argument_group("generation (mining and evaluation)")
    gen.add_argument("--num_inference_steps", type=int, default=20)
    gen.add_argument("--guidance_scale", type=float, default=3.0)
    gen.add_argument("--resolution", type=int, default=32)
    gen.add_argument("--batch_size", type=int, default=48, help="images per pipeline call")
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument(
        "--eval_images_per_prompt", type=int, default=16, help="evaluation seeds per held-out prompt"
    )
    p.add_argument("--output_dir", default="outputs/iterative")
    p.add_argument(
        "--cache_dir", default=None,
        help="image and score cache of mining and evaluation (default OUTPUT_DIR/images); share it between studies",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return p


# the entry points the rounds are made of, run in this process


def _experiment():
    """``data/synthetic_experiment.py``: its runners of the entry points in this process and its
    base-model stages."""
    if str(ROOT / "data") not in sys.path:
        sys.path.insert(0, str(ROOT / "data"))
    return importlib.import_module("synthetic_experiment")


def run_mine_pairs(argv: list[str]) -> dict:
    return _experiment()._load_script(ROOT / "data" / "mine_pairs.py").main(argv)


def run_train_sd(argv: list[str]) -> dict:
    return _experiment().run_train_sd(argv)


def run_evaluate(argv: list[str]) -> dict:
    return _experiment().run_evaluate(argv)


# ----------------------------------------------------------------------------------------------


def mining_seed(seed: int, round_: int) -> int:
    """First sampling seed of a round's mining: fresh images every round, never the evaluation's."""
    return seed + 100_000 * round_


def evaluation_seed(seed: int) -> int:
    return seed + 10_000_000


def default_prompts(out: Path) -> tuple[Path, Path]:
    """The shapes world's training and held-out prompts, one per line, written under ``out``."""
    from diffusion_dpo import synthetic

    out.mkdir(parents=True, exist_ok=True)
    train, heldout = out / "prompts_train.txt", out / "prompts_heldout.txt"
    train.write_text("\n".join(synthetic.caption(s) for s in synthetic.specs_for(False)) + "\n")
    heldout.write_text("\n".join(synthetic.heldout_prompts()) + "\n")
    return train, heldout


def ensure_base(model: str) -> None:
    """Build the synthetic experiment's pretrained base if it is the model asked for and it is missing:
    that experiment's stages data, vae and base (its full scale, seed 0), recorded in its stages.json,
    so ``data/synthetic_experiment.py --output_dir outputs/synthetic --resume`` reuses them."""
    if Path(model) != SYNTHETIC_BASE or (SYNTHETIC_BASE / "model_index.json").is_file():
        return
    experiment = _experiment()
    print(f"building the pretrained base at {SYNTHETIC_BASE} with the synthetic experiment's first stages")
    stages = experiment.Stages(["data", "vae", "base"], SYNTHETIC_OUT / "stages.json", resume=True)
    SYNTHETIC_OUT.mkdir(parents=True, exist_ok=True)
    experiment.prepare_seed(argparse.Namespace(world="shapes"), 0, SYNTHETIC_OUT, experiment.FULL, stages)


def _looks_local(value: str) -> bool:
    # a hub id is OWNER/NAME; anything else (absolute, relative, with a file suffix) is a path here
    path = Path(value)
    return path.is_absolute() or value.startswith(".") or bool(path.suffix) or value.count("/") != 1


def check_args(args) -> None:
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    if args.num_images_per_prompt < 2:
        raise ValueError("--num_images_per_prompt must be >= 2: a pair needs two images of a prompt")
    if not Path(args.train_config).is_file():
        raise ValueError(f"--train_config {args.train_config}: no such file")
    for item in args.train_arg:
        key = item.split("=", 1)[0]
        if "=" not in item or not key:
            raise ValueError(f"--train_arg {item!r}: expected KEY=VALUE, e.g. beta_dpo=100")
        if key in ("pretrained_model_name_or_path", "dataset_name", "output_dir", "config"):
            raise ValueError(f"--train_arg {key}: the driver sets it for every round")
    if not Path(args.model).exists() and Path(args.model) != SYNTHETIC_BASE and _looks_local(args.model):
        raise ValueError(f"--model {args.model}: no such folder, and not a hub id (OWNER/NAME)")
    for flag in ("prompts", "heldout_prompts"):
        value = getattr(args, flag)
        builtin = value is not None and value.split(":")[0] == "hpsv2"  # the suite's named prompt set
        if value is not None and not builtin and not Path(value).exists() and _looks_local(value):
            raise ValueError(f"--{flag} {value}: no such file")


def mine_round(args, round_: int, model: str, prompts: Path, out: Path, cache: Path) -> dict:
    argv = [
        "--model", model, "--prompts", str(prompts), "--output", str(out),
        "--num_images_per_prompt", str(args.num_images_per_prompt), "--pairing", args.pairing,
        "--min_margin", str(args.min_margin), "--min_prompt_spread", str(args.min_prompt_spread),
        "--seed", str(mining_seed(args.seed, round_)), "--cache_dir", str(cache),
        "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
        "--resolution", str(args.resolution), "--batch_size", str(args.batch_size), "--device", args.device,
    ]  # fmt: skip
    for spec in args.mining_scorer:
        argv += ["--scorer", spec]
    if args.scorer_weights:
        argv += ["--scorer_weights", args.scorer_weights]
    if args.pairs_per_prompt:
        argv += ["--pairs_per_prompt", str(args.pairs_per_prompt)]
    return run_mine_pairs(argv)


def train_round(args, model: str, dataset: str, out: Path) -> dict:
    argv = [
        "--config", args.train_config, "--pretrained_model_name_or_path", model,
        "--dataset_name", dataset, "--output_dir", str(out), "--seed", str(args.seed),
    ]  # fmt: skip
    for item in args.train_arg:
        key, value = item.split("=", 1)
        argv += [f"--{key}", value]
    return run_train_sd(argv)


def next_round_model(model_dir: Path) -> str:
    """The pipeline folder the next round starts from: the round's own output, or for a LoRA round the
    model it trained on with the adapters fused in, saved once as a pipeline in ``model_dir/merged``
    (so the next round's LoRA starts from, and is referenced against, this round's model)."""
    from diffusion_dpo.evaluation.generate import LORA_WEIGHTS, load_pipeline, resolve_model

    if (model_dir / "model_index.json").is_file():
        return str(model_dir)
    if not (model_dir / LORA_WEIGHTS).is_file():
        raise ValueError(
            f"{model_dir} holds neither a pipeline (model_index.json) nor LoRA weights ({LORA_WEIGHTS})"
        )
    merged = model_dir / "merged"
    if not (merged / "model_index.json").is_file():
        pipe = load_pipeline(resolve_model("lora", str(model_dir)))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.save_pretrained(merged)
    return str(merged)


def evaluate_models(
    args, models: dict[str, str], prompts: Path, scorers: list[str], out: Path, cache: Path
) -> dict:
    argv = [
        *(a for name, path in models.items() for a in ("--model", f"{name}={path}")),
        "--prompts", str(prompts), "--output_dir", str(out), "--cache_dir", str(cache),
        "--num_images_per_prompt", str(args.eval_images_per_prompt), "--seed", str(evaluation_seed(args.seed)),
        "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
        "--resolution", str(args.resolution), "--batch_size", str(args.batch_size), "--device", args.device,
        "--no_progress",
    ]  # fmt: skip
    for spec in scorers:
        argv += ["--scorer", spec]
    return run_evaluate(argv)


def table_rows(
    summary: dict, mined: dict[str, dict], scorers: list[str], vs_previous: dict[str, dict]
) -> list[dict]:
    """One row per model of the evaluation ``summary``: its mined pairs, then per scorer the mean score
    on the held-out prompts, the win rate against round 0 and the win rate against the round before
    (``vs_previous``: model name -> scorer -> win rate), each with its 95% interval."""
    rows = []
    for name in summary["models"]:
        row = {"model": name, "pairs": None, "mined_margin": None, "scores": {}}
        if name in mined:
            m = mined[name]
            row["pairs"] = m["num_pairs"]
            row["mined_margin"] = m["mean_chosen_score"] - m["mean_rejected_score"]
        for s in scorers:
            row["scores"][s] = {
                "mean": summary["scores"][name][s]["mean"],
                "win_rate_vs_base": summary["win_rates"].get(name, {}).get(s),
                "win_rate_vs_previous": vs_previous.get(name, {}).get(s),
            }
        rows.append(row)
    return rows


def _interval(wr: dict | None) -> str:
    return "-" if wr is None else f"{wr['win_rate']:.3f} [{wr['ci_low']:.3f}, {wr['ci_high']:.3f}]"


def format_table(rows: list[dict], mining: list[str], heldout: list[str]) -> str:
    """A Markdown table: the mining scorer(s) first, then the held-out one(s)."""
    scorers = [(s, "mining") for s in mining] + [(s, "held-out") for s in heldout if s not in mining]
    head = ["model", "mined pairs", "mined margin"]
    for s, role in scorers:
        head += [f"{s} ({role}) mean", "win rate vs round 0 [95% CI]", "vs the round before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], "-" if r["pairs"] is None else str(r["pairs"])]
        cells.append("-" if r["mined_margin"] is None else f"{r['mined_margin']:.3f}")
        for s, _ in scorers:
            v = r["scores"][s]
            cells += [
                f"{v['mean']:.3f}",
                _interval(v["win_rate_vs_base"]),
                _interval(v["win_rate_vs_previous"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> dict:
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.mining_scorer = args.mining_scorer or ["shapes"]
    args.heldout_scorer = args.heldout_scorer or ["shapes"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world_train, world_heldout = default_prompts(out)  # the shapes world's, where none are given
    prompts = Path(args.prompts) if args.prompts else world_train
    heldout = Path(args.heldout_prompts) if args.heldout_prompts else world_heldout
    ensure_base(args.model)
    scorers = list(dict.fromkeys([*args.mining_scorer, *args.heldout_scorer]))
    images = Path(args.cache_dir) if args.cache_dir else out / "images"  # mining and evaluation, every round

    models = {"round_0": args.model}
    mined: dict[str, dict] = {}
    vs_previous: dict[str, dict] = {}
    results: dict = {"settings": dict(vars(args)), "rounds": []}
    current = args.model
    for r in range(1, args.rounds + 1):
        name, rdir = f"round_{r}", out / f"round_{r}"
        print(f"\n=== round {r}/{args.rounds}: mining from {current} ===", flush=True)
        mined[name] = mine_round(args, r, str(current), prompts, rdir / "pairs", images)
        print(
            f"  {mined[name]['num_pairs']} pairs from {mined[name]['num_prompts']} prompts "
            f"({mined[name]['prompts_dropped']} dropped); chosen {mined[name]['mean_chosen_score']:.3f} vs "
            f"rejected {mined[name]['mean_rejected_score']:.3f}",
            flush=True,
        )
        if mined[name]["num_pairs"] == 0:
            raise ValueError(
                f"round {r} mined no pairs: every prompt's images scored alike; lower --min_margin or "
                "--min_prompt_spread, or raise --num_images_per_prompt"
            )
        model_dir = rdir / "model"
        if (model_dir / "summary.json").is_file():  # a finished run (the trainer writes it last)
            print(f"  reusing the trained model of round {r} at {model_dir}", flush=True)
            train_summary = json.loads((model_dir / "summary.json").read_text())
        else:
            print(
                f"=== round {r}/{args.rounds}: training from {current} (also the reference) ===", flush=True
            )
            train_summary = train_round(args, str(current), str(mined[name]["output"]), model_dir)
        current = next_round_model(model_dir)
        models[name] = current
        print(
            f"=== round {r}/{args.rounds}: evaluating {', '.join(models)} on held-out prompts ===", flush=True
        )
        summary = evaluate_models(args, models, heldout, scorers, out / "eval", images)
        if r == 1:
            vs_previous[name] = summary["win_rates"][name]
        else:  # the same cached images and scores, compared with the round before as the baseline
            previous = {f"round_{r - 1}": models[f"round_{r - 1}"], name: current}
            pair = evaluate_models(
                args, previous, heldout, scorers, out / f"eval_round_{r}_vs_{r - 1}", images
            )
            vs_previous[name] = pair["win_rates"][name]
        rows = table_rows(summary, mined, scorers, vs_previous)
        table = format_table(rows, args.mining_scorer, args.heldout_scorer)
        print(f"\nafter round {r}:\n{table}\n", flush=True)
        results["rounds"].append(
            {
                "round": r,
                "mining": {k: (str(v) if isinstance(v, Path) else v) for k, v in mined[name].items()},
                "train_last_metrics": train_summary.get("last_metrics"),
            }
        )
        results["table"] = rows
        results["table_markdown"] = table
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "results.md").write_text(_markdown(args, table, summary))
    return results


def _markdown(args, table: str, summary: dict) -> str:
    mining = " + ".join(args.mining_scorer)
    heldout = ", ".join(args.heldout_scorer)
    return (
        f"# Iterative Diffusion-DPO: {args.rounds} rounds mined with {mining}, held out: {heldout}\n\n"
        f"{summary['n_prompts']} held-out prompts × {len(summary['seeds'])} seeds per model; win rates against "
        "round 0 with cluster-bootstrap 95% intervals over prompts (the evaluation suite's).\n\n"
        f"{table}\n\n"
        f"Command: `python data/iterative_dpo.py {' '.join(args.argv)}`\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a round that cannot go on says why, without a stack trace
        sys.exit(f"error: {err}")
