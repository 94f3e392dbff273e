#!/usr/bin/env python
"""Do the monitors see a run going bad, and do the guards help? A bounded study in the synthetic
shapes world (data/synthetic_experiment.py's machinery, its --quick scale), for docs/monitors.md.

    python examples/monitor_study.py --output_dir outputs/monitor_study [--seeds 0 1 2]

Per seed: the world's data, VAE and base (as the experiment builds them), then Diffusion-DPO from the
base (configs/synthetic_dpo.yaml, 60 steps, held-out implicit accuracy every 10) at

- ``tuned``: the config's learning rate;
- ``x10``: 10x that learning rate (the setting that degrades);
- ``x10_safeguard``: 10x with ``--winner_safeguard``; ``x10_auto_beta``: 10x with ``--auto_beta``;
- ``tuned_safeguard``: the tuned learning rate with ``--winner_safeguard`` (what the guard costs when
  nothing goes wrong).

``--settings`` runs a subset. ``results.md`` covers every seed in the folder: per run, then per setting
across seeds (the mean win rate with a t-interval over seeds, and paired differences: each seed is its
own world, base and data, easier or harder for every setting alike).

Every model renders the held-out prompts from the same seeds as the base; the table gives each one's
win rate against the base (shapes scorer, 95% bootstrap interval over prompts), its final held-out
implicit accuracy, and the first monitor warning (step, monitor) of its run. During training every
validation also logs the held-out win rate of the run's samples against its reference, the base
(``--validation_scorer shapes``: the 24 held-out prompts with the evaluation's seeds and sampling
settings, so the last point is the evaluation's win rate): ``win_rate_curve`` in results.json, so the
study shows whether the monitors fire before the samples get worse. One torch thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = {  # name: (learning-rate factor, max_train_steps, extra flags)
    "tuned": (1, 60, []),
    "x10": (10, 60, []),
    "x10_safeguard": (10, 60, ["--winner_safeguard"]),
    "x10_auto_beta": (10, 60, ["--auto_beta"]),
    "tuned_safeguard": (1, 60, ["--winner_safeguard"]),  # what the guard costs where nothing goes wrong
}


def _experiment():
    spec = importlib.util.spec_from_file_location(
        "synthetic_experiment", ROOT / "data/synthetic_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _first_warning(model_dir: Path) -> dict | None:
    summary = json.loads((model_dir / "summary.json").read_text())
    warnings = summary.get("monitors/warnings") or []
    return {"step": warnings[0]["step"], "monitor": warnings[0]["monitor"]} if warnings else None


def _curve(model_dir: Path, *keys: str) -> list[list]:
    """``[step, value of each key]`` at every validation (rows that have the first key)."""
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], *(round(r[k], 4) for k in keys)] for r in rows if r.get(keys[0]) is not None]


WIN_RATE_KEYS = ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high")


def _win_rate_flags(scale) -> list[str]:
    # sampled as the final evaluation samples (its seeds, steps and guidance), against the run's reference
    return [
        "--validation_scorer", "shapes", "--num_validation_images", str(scale.images_per_prompt),
        "--num_inference_steps", str(scale.inference_steps), "--guidance_scale", str(scale.guidance_scale),
    ]  # fmt: skip


def run_seed(exp, seed: int, out: Path, lr: float, settings: list[str]) -> dict:
    scale = exp.replace(exp.scale_for("sd15", True), validation_steps=10)
    stages = exp.Stages(["data", "vae", "base", *settings, "evaluate"], out / "stages.json", resume=True)
    args = argparse.Namespace(world="shapes", arch="sd15")
    data, models = exp.prepare_seed(args, seed, out, scale, stages)
    trained = {}
    for name in settings:
        factor, steps, extra = SETTINGS[name]
        trained[name] = out / "models" / name
        flags = [
            *exp._validation_flags(data, scale, "shapes"), *_win_rate_flags(scale), "--max_train_steps", str(steps),
            *extra,
        ]  # fmt: skip
        stages.run(
            name, f"DPO lr x{factor}, {steps} steps {' '.join(extra)}", exp.train_stage, "dpo", models["base"],
            data["pairs"], trained[name], exp.replace(scale, train_steps={}), seed, flags,
            {"learning_rate": lr * factor},
        )  # fmt: skip
    eval_dir = out / "eval"
    stages.run(
        "evaluate", "held-out prompts, every model vs the base", exp.evaluate,
        {"base": models["base"], **trained}, data, eval_dir, scale, seed, "cpu",
    )  # fmt: skip
    table = exp.results.method_results(json.loads((eval_dir / "summary.json").read_text()), tuple(settings))
    for name in settings:
        table[name]["first_warning"] = _first_warning(trained[name])
        table[name]["implicit_acc_curve"] = _curve(trained[name], "eval/implicit_acc")
        table[name]["win_rate_curve"] = _curve(trained[name], *WIN_RATE_KEYS)  # [step, rate, low, high]
    (out / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


def markdown(tables: dict[int, dict]) -> str:
    lines = [
        "| setting | seed | win rate vs base [95% CI] | held-out implicit acc (peak -> final) "
        "| win rate during training, steps " + "/".join(str(s) for s, *_ in _first_curve(tables)) + " "
        "| first interval below 0.5 | first warning |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        for seed, table in tables.items():
            if name not in table:
                continue
            row = table[name]
            curve = [acc for _, acc in row["implicit_acc_curve"]]
            warning = row["first_warning"]
            said = f"step {warning['step']}: `{warning['monitor']}`" if warning else "none"
            wins = row.get("win_rate_curve") or []
            below = next((step for step, _, _, high in wins if high < 0.5), None)
            lines.append(
                f"| {name} | {seed} | {row['win_rate']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}] | "
                f"{max(curve):.2f} -> {curve[-1]:.2f} | {', '.join(f'{w:.2f}' for _, w, _, _ in wins) or '-'} | "
                f"{f'step {below}' if below is not None else 'none'} | {said} |"
            )
    return "\n".join(lines)


def _first_curve(tables: dict[int, dict]) -> list:
    first = next(iter(tables.values()), {})
    return next((row.get("win_rate_curve") or [] for name, row in first.items() if name in SETTINGS), [])


#: Student's t 0.975 quantiles for 0..9 degrees of freedom (a table: scipy is not a dependency)
T975 = (float("nan"), 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def across_seeds(tables: dict[int, dict]) -> str:
    """Per setting over the seeds: the mean win rate vs base with a 95% t-interval over seeds (each seed
    is its own world, base and data, so seeds are the independent units), how many seeds' own interval
    clears 0.5, and how many runs warned."""
    lines = [
        "| setting | seeds | mean win rate vs base [95% CI over seeds] | per seed | minus tuned, paired [95% CI] "
        "| minus x10, paired | interval above 0.5 | warned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        rows = [table[name] for table in tables.values() if name in table]
        if not rows:
            continue
        rates = [row["win_rate"] for row in rows]
        # each seed's world is easier or harder for every setting alike: the paired difference is sharper
        paired = {
            other: [
                t[name]["win_rate"] - t[other]["win_rate"]
                for t in tables.values()
                if name in t and other in t
            ]
            for other in ("tuned", "x10")
        }
        differences = " | ".join(
            _mean_ci(paired[other], signed=True) if other != name and paired[other] else "-"
            for other in ("tuned", "x10")
        )
        above = sum(row["ci_low"] > 0.5 for row in rows)
        warned = sum(row["first_warning"] is not None for row in rows)
        lines.append(
            f"| {name} | {len(rows)} | {_mean_ci(rates)} | {', '.join(f'{r:.2f}' for r in rates)} | "
            f"{differences} | {above}/{len(rows)} | {warned}/{len(rows)} |"
        )
    return "\n".join(lines)


def _mean_ci(values: list[float], signed: bool = False) -> str:
    import statistics

    mean = statistics.fmean(values)
    n, f = len(values), "+.2f" if signed else ".2f"
    if not 1 < n <= len(T975):
        return f"{mean:{f}}"
    half = T975[n - 1] * statistics.stdev(values) / n**0.5
    low, high = mean - half, mean + half
    if not signed:  # a win rate lies in [0, 1]
        low, high = max(low, 0.0), min(high, 1.0)
    return f"{mean:{f}} [{low:{f}}, {high:{f}}]"


def _done_seeds(out: Path) -> dict[int, dict]:
    # every seed this output folder already holds, so results.md covers runs of several invocations
    found = {}
    for path in sorted(out.glob("seed-*/results.json")):
        found[int(path.parent.name.removeprefix("seed-"))] = json.loads(path.read_text())
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", default="outputs/monitor_study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="A subset of the runs."
    )
    args = parser.parse_args(argv)
    import torch
    import yaml

    torch.set_num_threads(1)
    exp = _experiment()
    lr = yaml.safe_load(exp.stage_config("dpo").read_text())["learning_rate"]
    started, out = time.time(), Path(args.output_dir)
    for seed in args.seeds:
        run_seed(exp, seed, out / f"seed-{seed}", lr, args.settings)
        tables = _done_seeds(out)
        text = markdown(tables) + "\n\n" + across_seeds(tables)
        (out / "results.md").write_text(text + "\n")
        print(text, f"\n({time.time() - started:.0f} s so far)", flush=True)


if __name__ == "__main__":
    main()
