#!/usr/bin/env python
"""Does it align? A preference-alignment experiment on the synthetic shapes world, rerunnable on a laptop.

    python data/synthetic_experiment.py --output_dir outputs/synthetic [--seed 0] [--quick]

Stages (each prints what it does and how long it took):

1. data      write the datasets of the shapes world (diffusion_dpo.data.synthetic): captioned images
             whose captions are wrong with probability CAPTION_NOISE (to pretrain the base), preference
             pairs and unpaired KTO data on the training combinations of (colour, shape, background),
             and preference pairs on the held-out combinations (never trained on);
2. vae       fit the tiny VAE on renders of the world (reconstruction + small KL), set its latent
             scaling factor, and save the untrained pipeline: random UNet, fitted VAE, tiny CLIP;
3. base      pretrain the UNet on the noisy-caption images: `train_sd.py --sft` with caption dropout,
             so classifier-free guidance works (configs/synthetic_pretrain.yaml);
4. dpo, sft, kto   fine-tune the base with Diffusion-DPO on the pairs, SFT on the pairs' winners and
             Diffusion-KTO on the unpaired data, each through train_sd.py (configs/synthetic_*.yaml);
5. evaluate  `eval/evaluate.py` renders the held-out prompts with every model from the same seeds,
             scores them with the `shapes` faithfulness scorer, computes win rates vs the base with
             bootstrap intervals and the implicit-reward accuracy on held-out pairs;
6. report    OUTPUT_DIR/results.json, results.md (the table, also printed), grid_base_vs_dpo.png and
             training_curves.png.

Everything is seeded by --seed (data, VAE, training, evaluation seeds): the same seed on the same
machine and thread count reproduces results.json. --quick runs a reduced version (fewer images and
steps) in a few minutes; its numbers show the direction of the effect, not its size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the repository's package
    sys.path.insert(0, str(ROOT))

from diffusion_dpo.data import synthetic  # noqa: E402
from diffusion_dpo.experiment import plots, results  # noqa: E402

logger = logging.getLogger("synthetic_experiment")

CONFIGS = ROOT / "configs"
METHODS = results.METHODS  # ("dpo", "sft", "kto")
RESOLUTION = 32
#: Share of pretraining captions replaced by another combination's caption: the base model learns that
#: a caption is only a weak hint, so it often ignores it and preference tuning has room to help.
CAPTION_NOISE = 0.3
#: The base UNet predicts the velocity (as SD 2.x does): a tiny epsilon-prediction UNet needs many more
#: steps than a laptop has before its samples from pure noise look like anything.
PREDICTION_TYPE = "v_prediction"


@dataclass(frozen=True)
class Scale:
    """How big one run is. Training hyperparameters (lr, β, batch, schedule) live in the YAML configs;
    ``train_steps`` overrides their ``max_train_steps`` (``None``: the config's value)."""

    n_vae_images: int  # renders the VAE is fitted on
    vae_steps: int
    n_caption_images: int  # base-model pretraining images (noisy captions)
    n_pairs: int  # preference pairs for DPO and SFT (training combinations)
    n_unpaired: int  # KTO images (training combinations), half desirable
    n_heldout_pairs: int  # preference pairs on held-out combinations (implicit accuracy)
    train_steps: dict[str, int | None]  # per stage: base, dpo, sft, kto
    validation_steps: int | None  # held-out implicit accuracy every N steps (DPO, KTO); None: config's
    images_per_prompt: int  # evaluation seeds per held-out prompt
    inference_steps: int  # DDIM steps at evaluation
    guidance_scale: float


FULL = Scale(
    n_vae_images=4096,
    vae_steps=300,
    n_caption_images=20000,
    n_pairs=4000,
    n_unpaired=8000,
    n_heldout_pairs=200,
    train_steps={"base": None, "dpo": None, "sft": None, "kto": None},
    validation_steps=None,
    images_per_prompt=9,
    inference_steps=20,
    guidance_scale=3.0,
)
QUICK = Scale(
    n_vae_images=1024,
    vae_steps=150,  # reconstructions score 0.78 (0.66 at 120 steps, 0.11 at 60)
    n_caption_images=4000,
    n_pairs=800,
    n_unpaired=1600,
    n_heldout_pairs=128,
    train_steps={"base": 400, "dpo": 100, "sft": 40, "kto": 40},
    validation_steps=25,
    images_per_prompt=4,
    inference_steps=10,
    guidance_scale=3.0,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="where data, models, evaluation and results go")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, VAE, training and evaluation")
    parser.add_argument("--quick", action="store_true", help="a reduced run (minutes): direction, not size")
    parser.add_argument(
        "--num_threads", type=int, default=2, help="torch CPU threads (the reported timings used 2)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for the evaluation")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the stages an earlier run in OUTPUT_DIR finished"
    )
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        parser.error(f"--num_threads must be >= 1, got {args.num_threads}")
    return args


# ----------------------------------------------------------------------------------------------
# the entry points this experiment is built on


def _load_script(path: Path):
    """Import an entry-point script (train_sd.py, eval/evaluate.py) to call its ``main(argv)``."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_train_sd(argv: list[str]) -> dict:
    """``train_sd.py ARGV`` in this process; returns its summary without the in-memory models."""
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps process-wide singletons; a fresh run needs fresh ones (as in the trainer tests)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    summary = _load_script(ROOT / "train_sd.py").main(argv)
    summary.pop("models", None)
    return summary


def run_evaluate(argv: list[str]) -> dict:
    """``eval/evaluate.py ARGV`` in this process; returns its summary."""
    return _load_script(ROOT / "eval" / "evaluate.py").main(argv)


# ----------------------------------------------------------------------------------------------
# stages


class Stages:
    """Runs the stages in order, printing a numbered header before each and its wall-clock time after.

    Finished stages are recorded in ``OUTPUT_DIR/stages.json`` (name → seconds); with ``resume`` a
    recorded stage is not run again (its outputs on disk are used), so an interrupted run continues
    where it stopped.
    """

    def __init__(self, names: list[str], record: Path, resume: bool):
        self.names = names
        self.record = record
        self.done: dict[str, float] = json.loads(record.read_text()) if resume and record.is_file() else {}
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []
        self.started = time.time()

    def run(self, name: str, what: str, fn, *args, **kwargs):
        number = f"[{self.names.index(name) + 1}/{len(self.names)}]"
        if name in self.done:
            print(
                f"\n{number} {name}: reusing the finished stage ({self.done[name]:.0f} s when it ran)",
                flush=True,
            )
            self.seconds[name] = self.done[name]
            self.reused.append(name)
            return None
        print(f"\n{number} {name}: {what}", flush=True)
        t0 = time.time()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t0, 1)
        self.done[name] = self.seconds[name]
        self.record.write_text(json.dumps(self.done, indent=2) + "\n")
        print(
            f"{number} {name} done in {self.seconds[name]:.0f} s (total {time.time() - self.started:.0f} s)",
            flush=True,
        )
        return out


def data_paths(data_dir: Path) -> dict[str, Path]:
    """Where :func:`write_data` writes each dataset."""
    return {
        "captions": data_dir / "captions_train.parquet",
        "pairs": data_dir / "pairs_train.parquet",
        "unpaired": data_dir / "unpaired_train.parquet",
        "heldout_pairs": data_dir / "pairs_heldout.parquet",
        "heldout_prompts": data_dir / "heldout_prompts.txt",
    }


def write_data(paths: dict[str, Path], scale: Scale, seed: int) -> None:
    """The datasets, each from its own seed. Pretraining images, pairs and unpaired data cover the
    training combinations only; the held-out pairs and prompts only the held-out combinations."""
    synthetic.write_caption_dataset(
        paths["captions"],
        scale.n_caption_images,
        seed=seed,
        resolution=RESOLUTION,
        caption_noise=CAPTION_NOISE,
    )
    synthetic.write_pair_dataset(paths["pairs"], scale.n_pairs, seed=seed + 1, resolution=RESOLUTION)
    synthetic.write_unpaired_dataset(
        paths["unpaired"], scale.n_unpaired, seed=seed + 2, resolution=RESOLUTION
    )
    synthetic.write_pair_dataset(
        paths["heldout_pairs"], scale.n_heldout_pairs, seed=seed + 3, resolution=RESOLUTION, heldout=True,
        tie_fraction=0.0,
    )  # fmt: skip
    paths["heldout_prompts"].write_text("\n".join(synthetic.heldout_prompts()) + "\n")
    n_train, n_heldout = (len(s) for s in synthetic.split_specs())
    print(
        f"  {scale.n_caption_images} captioned images (caption noise {CAPTION_NOISE}), {scale.n_pairs} pairs and "
        f"{scale.n_unpaired} unpaired images on the {n_train} training combinations; {scale.n_heldout_pairs} "
        f"pairs and {n_heldout} prompts on the {n_heldout} held-out combinations"
    )


def build_initial_pipeline(path: Path, scale: Scale, seed: int) -> None:
    """Fit the VAE and save the untrained SD-shaped pipeline (random UNet) that pretraining starts from."""
    import numpy as np

    from diffusion_dpo.experiment.vae import (
        build_base_pipeline,
        fit_vae,
        images_to_tensor,
        reconstruct,
        tensor_to_images,
    )

    rng = np.random.default_rng(seed + 4)
    specs = [synthetic.sample_spec(rng) for _ in range(scale.n_vae_images)]
    pixels = images_to_tensor([synthetic.render(s, rng, RESOLUTION) for s in specs])
    vae = fit_vae(pixels, steps=scale.vae_steps, seed=seed)
    n = min(128, len(specs))
    renders = tensor_to_images(pixels[:n])
    recons = tensor_to_images(reconstruct(vae, pixels[:n]))

    def mean_faithfulness(images) -> float:
        return round(float(np.mean([synthetic.faithfulness(i, s) for i, s in zip(images, specs)])), 4)

    check = {
        "render_faithfulness": mean_faithfulness(renders),
        "vae_reconstruction_faithfulness": mean_faithfulness(recons),
        "vae_scaling_factor": round(float(vae.config.scaling_factor), 6),
    }
    print(
        f"  faithfulness of {n} renders {check['render_faithfulness']:.3f}, of their VAE reconstructions "
        f"{check['vae_reconstruction_faithfulness']:.3f} (the ceiling for generated images); latent "
        f"scaling factor {check['vae_scaling_factor']:.4f}"
    )
    build_base_pipeline(
        vae, seed=seed, resolution=RESOLUTION, prediction_type=PREDICTION_TYPE
    ).save_pretrained(path)
    (path / "vae_check.json").write_text(json.dumps(check, indent=2) + "\n")


def train_stage(name: str, model: Path, dataset: Path, out: Path, scale: Scale, seed: int, extra=()) -> None:
    """``train_sd.py --config configs/synthetic_NAME.yaml`` with this run's paths, seed and sizes."""
    argv = [
        "--config", str(CONFIGS / f"synthetic_{'pretrain' if name == 'base' else name}.yaml"),
        "--pretrained_model_name_or_path", str(model),
        "--dataset_name", str(dataset),
        "--output_dir", str(out),
        "--seed", str(seed),
        *extra,
    ]  # fmt: skip
    if scale.train_steps.get(name) is not None:
        argv += ["--max_train_steps", str(scale.train_steps[name])]
    summary = run_train_sd(argv)
    print(f"  {name}: {summary['global_step']} steps; last step: {_short(summary['last_metrics'])}")


def _short(row: dict) -> str:
    keys = ("loss", "rewards/margins", "rewards/accuracies", "kto/kl", "eval/implicit_acc")
    return ", ".join(f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None)


def evaluate(
    models: dict[str, Path], data: dict[str, Path], out: Path, scale: Scale, seed: int, device: str
) -> None:
    """``eval/evaluate.py``: the held-out prompts with every model from seeds ``seed..seed+S-1``."""
    run_evaluate([
        *(arg for name, path in models.items() for arg in ("--model", f"{name}={path}")),
        "--prompts", str(data["heldout_prompts"]),
        "--scorer", "shapes",
        "--output_dir", str(out),
        "--num_images_per_prompt", str(scale.images_per_prompt),
        "--seed", str(seed),
        "--num_inference_steps", str(scale.inference_steps),
        "--guidance_scale", str(scale.guidance_scale),
        "--resolution", str(RESOLUTION),
        "--batch_size", "48",
        "--device", device,
        "--implicit_pairs", str(data["heldout_pairs"]),
        "--implicit_max_pairs", str(scale.n_heldout_pairs),
        "--no_progress",
    ])  # fmt: skip


def write_figures(
    out: Path, eval_dir: Path, train_dirs: dict[str, Path], n_columns: int = 12
) -> dict[str, Path]:
    """``grid_base_vs_dpo.png`` (the first seed of the first held-out prompts, base above DPO) and
    ``training_curves.png`` (the fine-tuning runs' ``metrics.jsonl``)."""
    import csv

    from PIL import Image

    first: dict[tuple[str, int], dict] = {}
    with (eval_dir / "scores.csv").open() as f:
        for row in csv.DictReader(f):
            if row["model"] in ("base", "dpo"):
                first.setdefault((row["model"], int(row["prompt_index"])), row)
    n = min(n_columns, len(first) // 2)
    images: dict[str, list] = {"base": [], "DPO": []}
    labels = []
    for p in range(n):
        spec = synthetic.parse_caption(first[("base", p)]["prompt"])
        labels.append(f"{spec.color} {spec.shape}\non {spec.background}")
        for model, row_name in (("base", "base"), ("dpo", "DPO")):
            with Image.open(eval_dir / first[(model, p)]["image"]) as image:
                images[row_name].append(image.convert("RGB"))
    return {
        "grid": plots.comparison_grid(images, labels, out / "grid_base_vs_dpo.png", scale=2),
        "curves": plots.plot_training_curves(
            {name: plots.read_metrics(path / "metrics.jsonl") for name, path in train_dirs.items()},
            out / "training_curves.png",
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns what it writes to ``OUTPUT_DIR/results.json``."""
    args = parse_args(argv)
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace) -> dict:
    import torch

    scale = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    data = data_paths(out / "data")
    models = {name: out / "models" / name for name in ("init", "base", *METHODS)}
    eval_dir = out / "eval"
    stages = Stages(["data", "vae", "base", *METHODS, "evaluate", "report"], out / "stages.json", args.resume)
    print(
        f"synthetic preference experiment ({'quick' if args.quick else 'full'}), seed {seed}, "
        f"{args.num_threads} torch threads, output in {out}"
    )

    stages.run("data", "writing the synthetic datasets", write_data, data, scale, seed)
    stages.run(
        "vae", f"fitting the tiny VAE ({scale.vae_steps} steps) and building the untrained pipeline",
        build_initial_pipeline, models["init"], scale, seed,
    )  # fmt: skip
    stages.run(
        "base", "pretraining the base UNet on noisy captions (train_sd.py, configs/synthetic_pretrain.yaml)",
        train_stage, "base", models["init"], data["captions"], models["base"], scale, seed,
    )  # fmt: skip
    validation = ["--validation_dataset_name", str(data["heldout_pairs"])]
    if scale.validation_steps is not None:
        validation += ["--validation_steps", str(scale.validation_steps)]
    validation += ["--num_validation_pairs", str(scale.n_heldout_pairs)]
    datasets = {"dpo": data["pairs"], "sft": data["pairs"], "kto": data["unpaired"]}
    titles = {
        "dpo": "Diffusion-DPO on the pairs",
        "sft": "SFT on the pairs' winners",
        "kto": "Diffusion-KTO on unpaired images",
    }
    for m in METHODS:
        # a full SFT fine-tune has no reference model, hence no implicit accuracy during its training
        extra = validation if m != "sft" else []
        stages.run(
            m, f"{titles[m]}, from the base (train_sd.py, configs/synthetic_{m}.yaml)",
            train_stage, m, models["base"], datasets[m], models[m], scale, seed, extra,
        )  # fmt: skip
    stages.run(
        "evaluate", f"{len(synthetic.heldout_prompts())} held-out prompts x {scale.images_per_prompt} seeds, every model "
        "(eval/evaluate.py --scorer shapes --implicit_pairs)",
        evaluate, {name: models[name] for name in ("base", *METHODS)}, data, eval_dir, scale, seed, args.device,
    )  # fmt: skip

    def report() -> tuple[dict, dict]:
        table = results.method_results(json.loads((eval_dir / "summary.json").read_text()))
        for name in ("base", *METHODS):
            table[name]["seconds"] = stages.seconds[name]
        return table, write_figures(out, eval_dir, {m: models[m] for m in METHODS})

    stages.done.pop("report", None)  # always rewritten: cheap, and it reads the current evaluation
    table, figures = stages.run("report", "results.json, results.md and the figures", report)
    # with --resume, the reused stages count with the time they took when they ran
    total = round(time.time() - stages.started + sum(stages.seconds[n] for n in stages.reused), 1)
    record = {
        **{m: table[m] for m in METHODS},
        "base": table["base"],
        "seconds": {**stages.seconds, "total": total},
        "settings": {
            "seed": seed,
            "quick": args.quick,
            "caption_noise": CAPTION_NOISE,
            "prediction_type": PREDICTION_TYPE,
            **json.loads((models["init"] / "vae_check.json").read_text()),
            **asdict(scale),
            "heldout_prompts": synthetic.heldout_prompts(),
            "num_threads": args.num_threads,
            "device": args.device,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "reused_stages": stages.reused,
        },
    }
    footer = (
        f"{table['dpo']['n']} (prompt, seed) pairs on {table['dpo']['n_prompts']} held-out prompts, "
        f"{scale.inference_steps} DDIM steps, guidance {scale.guidance_scale}; total time {total:.0f} s "
        f"({args.num_threads} torch threads)."
    )
    markdown = results.markdown_table(table) + "\n\n" + footer
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    print("\n" + markdown)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {figures['grid']}, {figures['curves']}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
