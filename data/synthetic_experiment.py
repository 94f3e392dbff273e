#!/usr/bin/env python
"""Does it align? A preference-alignment experiment on the synthetic shapes world, rerunnable on a laptop.

    python data/synthetic_experiment.py --output_dir outputs/synthetic [--seed 0] [--quick]

Stages (each prints what it does and how long it took):

1. data      write the datasets of the shapes world (diffusion_dpo.synthetic): captioned images
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

The imperfect world (--world imperfect) is the case Diffusion-DPO is for: both images of a pair are
usually wrong (0, 1 or 2 wrong attributes each), and a noisy Bradley-Terry annotator, as often in
agreement with another as Pick-a-Pic's people (68%), prefers the one with fewer or milder errors. It
compares DPO, SFT on winners, KTO, IPO and MaPO. With --tune, each method's learning rate (and β)
is chosen on validation prompts (neither trained on nor the final held-out ones), with the same number
of trials for every method; with --seeds S1 S2 ..., the whole study (data, VAE, base, fine-tunes,
evaluation) is repeated per seed under OUTPUT_DIR/seed-S and the final numbers on the held-out
prompts are reported with their seed-to-seed spread, and DPO against SFT head to head.

    python data/synthetic_experiment.py --world imperfect --tune --seeds 0 1 2 --output_dir outputs/imperfect

--arch sd3 runs the shapes world's stages on a tiny Stable Diffusion 3-shaped model instead
(diffusion_dpo.models.tiny.build_tiny_sd3_pipeline: an MMDiT transformer on 16-channel latents, two
tiny CLIPs and a tiny T5, rectified flow): the VAE is fitted with 16 latent channels and SD3's latent
normalisation ((z − shift)·scale), the base is pretrained by flow matching, and DPO, SFT and KTO train
through configs/synthetic_sd3_*.yaml (their own β and learning rates, measured there).

    python data/synthetic_experiment.py --arch sd3 --output_dir outputs/synthetic_sd3 [--quick]
"""

# Why a script of ~730 lines: it is the study's driver, its stages run the entry points (train_sd.py,
# eval/evaluate.py) in this process and the tests drive and patch them as this module's attributes
# (tests/trainer_runs.py: load_synthetic_experiment). Its library parts live in diffusion_dpo.synthetic
# (world, base model and VAE, results, plots); the stage bookkeeping (Stages, Scale) is the next to move.

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the repository's package
    sys.path.insert(0, str(ROOT))

from diffusion_dpo import synthetic  # noqa: E402
from diffusion_dpo.synthetic import plots, results  # noqa: E402

logger = logging.getLogger("synthetic_experiment")

CONFIGS = ROOT / "configs"
#: ``--arch``: the tiny model family the stages build and train, and the prefix of its stage configs
#: (``configs/PREFIX{pretrain,dpo,sft,kto,...}.yaml``).
ARCH_CONFIG_PREFIX = {"sd15": "synthetic_", "sd3": "synthetic_sd3_"}
#: How each arch samples at evaluation (the footer of the results table).
ARCH_SAMPLER = {"sd15": "DDIM", "sd3": "flow-matching Euler"}
METHODS = results.METHODS  # ("dpo", "sft", "kto")
WORLD_METHODS = {"shapes": METHODS, "imperfect": ("dpo", "sft", "kto", "ipo", "mapo")}
#: Methods trained through another method's config: IPO is the dpo objective with --loss_type ipo.
METHOD_CONFIG = {"ipo": ("dpo", ("--loss_type", "ipo"))}
#: The hyperparameter search of --tune: the same number of trials (4) for every method, a learning rate
#: and a β (or for SFT four learning rates). β in the paper code's convention (docs/beta.md); the tiny
#: default, a base much like this one, learned best at β 50-100 and saturated at the paper's 5000, so
#: the grid spans 100-1000; IPO's target margin 1/(2β) is then 5e-3 or 5e-4.
SEARCH: dict[str, list[dict]] = {
    "dpo": [{"learning_rate": lr, "beta_dpo": b} for lr in (1e-4, 3e-4) for b in (100, 1000)],
    "ipo": [{"learning_rate": lr, "beta_dpo": b} for lr in (1e-4, 3e-4) for b in (100, 1000)],
    "kto": [{"learning_rate": lr, "beta_dpo": b} for lr in (3e-5, 1e-4) for b in (100, 1000)],
    "mapo": [{"learning_rate": lr, "beta_mapo": b} for lr in (1e-4, 3e-4) for b in (0.1, 1.0)],
    "sft": [{"learning_rate": lr} for lr in (3e-5, 1e-4, 3e-4, 1e-3)],
}
RESOLUTION = 32
#: Share of pretraining captions replaced by another combination's caption: the base model learns that
#: a caption is only a weak hint, so it often ignores it and preference tuning has room to help.
CAPTION_NOISE = 0.3
#: The base UNet predicts the velocity (as SD 2.x does): a tiny epsilon-prediction UNet needs many more
#: steps than a laptop has before its samples from pure noise look like anything.
PREDICTION_TYPE = "v_prediction"
#: What each arch's denoiser predicts (results.json's settings); SD3 is a flow model: the velocity ε − x0.
ARCH_PREDICTION = {"sd15": PREDICTION_TYPE, "sd3": "flow_matching"}


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
    inference_steps: int  # sampler steps at evaluation (DDIM; flow-matching Euler for SD3)
    guidance_scale: float


FULL = Scale(
    n_vae_images=4096,
    vae_steps=300,
    n_caption_images=20000,
    n_pairs=4000,
    n_unpaired=8000,
    n_heldout_pairs=200,
    train_steps={"base": None, "dpo": None, "sft": None, "kto": None, "ipo": None, "mapo": None},
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
    train_steps={"base": 400, "dpo": 100, "sft": 40, "kto": 40, "ipo": 100, "mapo": 100},
    validation_steps=25,
    images_per_prompt=4,
    inference_steps=10,
    guidance_scale=3.0,
)
#: --arch sd3: the same data and evaluation sizes, its own training lengths (the stage configs
#: configs/synthetic_sd3_*.yaml hold the full scale's).
SD3_FULL = replace(FULL, train_steps={"base": None, "dpo": None, "sft": None, "kto": None})
SD3_QUICK = replace(QUICK, train_steps={"base": 400, "dpo": 100, "sft": 40, "kto": 40})
SCALES = {("sd15", False): FULL, ("sd15", True): QUICK, ("sd3", False): SD3_FULL, ("sd3", True): SD3_QUICK}


def scale_for(arch: str, quick: bool) -> Scale:
    """The run size of ``--arch`` at the full scale or ``--quick``."""
    return SCALES[(arch, quick)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="where data, models, evaluation and results go")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, VAE, training and evaluation")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help="repeat the whole study per seed (OUTPUT_DIR/seed-S) and report the spread; overrides --seed",
    )  # fmt: skip
    parser.add_argument(
        "--world", choices=tuple(WORLD_METHODS), default="shapes",
        help="shapes: winners follow the caption; imperfect: both images flawed, noisy annotators",
    )  # fmt: skip
    parser.add_argument(
        "--tune", action="store_true",
        help="choose each method's learning rate (and β) on validation prompts first, the same number of "
        "trials per method (needs --world imperfect: the shapes world has no validation split)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a reduced run (minutes): direction, not size")
    parser.add_argument(
        "--arch", choices=tuple(ARCH_CONFIG_PREFIX), default="sd15",
        help="the tiny model: sd15 (UNet, DDPM v-prediction) or sd3 (MMDiT, rectified flow, 2 CLIPs + T5; "
        "shapes world only)",
    )  # fmt: skip
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
    if args.tune and args.world != "imperfect":
        parser.error("--tune needs --world imperfect (the shapes world's prompts have no validation split)")
    if args.arch != "sd15" and args.world != "shapes":
        parser.error(
            f"--arch {args.arch} runs the shapes world only (its hyperparameters were measured there)"
        )
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
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
    from diffusion_dpo.training.distributed import reset_accelerate_state

    reset_accelerate_state()  # accelerate keeps process-wide singletons; a fresh run needs fresh ones
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
        "validation_pairs": data_dir / "pairs_validation.parquet",
        "validation_prompts": data_dir / "validation_prompts.txt",
    }


def write_data(paths: dict[str, Path], scale: Scale, seed: int, world: str = "shapes") -> None:
    """The datasets, each from its own seed. Pretraining images, pairs and unpaired data cover the
    training combinations only; the held-out pairs and prompts only the held-out combinations.

    ``imperfect``: the training combinations lose a validation share (validation prompts and pairs,
    for choosing hyperparameters), the pairs are :func:`synthetic.generate_imperfect_pairs` and the
    KTO images come from them as Diffusion-KTO makes them from Pick-a-Pic (an image that won a
    comparison is desirable)."""
    if world == "shapes":
        train, validation = synthetic.specs_for(False), ()
        synthetic.write_pair_dataset(paths["pairs"], scale.n_pairs, seed=seed + 1, resolution=RESOLUTION)
        synthetic.write_unpaired_dataset(
            paths["unpaired"], scale.n_unpaired, seed=seed + 2, resolution=RESOLUTION
        )
    else:
        from diffusion_dpo.data import load_pair_dataset, pairs_to_unpaired

        train, validation = synthetic.validation_split()
        synthetic.write_imperfect_pair_dataset(
            paths["pairs"], scale.n_pairs, seed=seed + 1, resolution=RESOLUTION, specs=train
        )
        pairs_to_unpaired(load_pair_dataset(str(paths["pairs"])), output_path=paths["unpaired"])
        synthetic.write_pair_dataset(
            paths["validation_pairs"], scale.n_heldout_pairs, seed=seed + 5, resolution=RESOLUTION,
            tie_fraction=0.0, specs=validation,
        )  # fmt: skip
        paths["validation_prompts"].write_text("\n".join(synthetic.caption(s) for s in validation) + "\n")
    synthetic.write_caption_dataset(
        paths["captions"], scale.n_caption_images, seed=seed, resolution=RESOLUTION,
        caption_noise=CAPTION_NOISE, specs=train,
    )  # fmt: skip
    synthetic.write_pair_dataset(
        paths["heldout_pairs"], scale.n_heldout_pairs, seed=seed + 3, resolution=RESOLUTION, heldout=True,
        tie_fraction=0.0,
    )  # fmt: skip
    paths["heldout_prompts"].write_text("\n".join(synthetic.heldout_prompts()) + "\n")
    n_heldout = len(synthetic.specs_for(True))
    kind = "imperfect pairs (noisy annotators)" if world == "imperfect" else "pairs"
    print(
        f"  {scale.n_caption_images} captioned images (caption noise {CAPTION_NOISE}), {scale.n_pairs} {kind} "
        f"and the unpaired KTO images on the {len(train)} training combinations; "
        + (f"{len(validation)} validation combinations; " if validation else "")
        + f"{scale.n_heldout_pairs} pairs and {n_heldout} prompts on the {n_heldout} held-out combinations"
    )


def build_initial_pipeline(path: Path, scale: Scale, seed: int, arch: str = "sd15") -> None:
    """Fit the VAE and save the untrained SD-shaped pipeline (random UNet, or for ``arch="sd3"`` random
    MMDiT) that pretraining starts from."""
    import numpy as np

    from diffusion_dpo.synthetic.vae import (
        ARCH_LATENT_CHANNELS,
        build_base_pipeline,
        fit_vae,
        images_to_tensor,
        reconstruct,
        tensor_to_images,
    )

    rng = np.random.default_rng(seed + 4)
    specs = [synthetic.sample_spec(rng) for _ in range(scale.n_vae_images)]
    pixels = images_to_tensor([synthetic.render(s, rng, RESOLUTION) for s in specs])
    vae = fit_vae(pixels, steps=scale.vae_steps, seed=seed, latent_channels=ARCH_LATENT_CHANNELS[arch])
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
    if arch == "sd3":
        check["vae_shift_factor"] = round(float(vae.config.shift_factor), 6)
    print(
        f"  faithfulness of {n} renders {check['render_faithfulness']:.3f}, of their VAE reconstructions "
        f"{check['vae_reconstruction_faithfulness']:.3f} (the ceiling for generated images); latent "
        f"scaling factor {check['vae_scaling_factor']:.4f}"
        + (f", shift factor {check['vae_shift_factor']:.4f}" if "vae_shift_factor" in check else "")
    )
    build_base_pipeline(
        vae, seed=seed, resolution=RESOLUTION, prediction_type=PREDICTION_TYPE, arch=arch
    ).save_pretrained(path)
    (path / "vae_check.json").write_text(json.dumps(check, indent=2) + "\n")


def stage_config(name: str, arch: str = "sd15") -> Path:
    """The config of stage ``name`` (base, dpo, sft, kto, ipo, mapo) for ``arch``:
    ``configs/synthetic_NAME.yaml`` (sd15) or ``configs/synthetic_sd3_NAME.yaml`` (sd3); the base's is
    ``..._pretrain.yaml``, IPO's the dpo one."""
    config = "pretrain" if name == "base" else METHOD_CONFIG.get(name, (name,))[0]
    return CONFIGS / f"{ARCH_CONFIG_PREFIX[arch]}{config}.yaml"


def train_stage(
    name: str,
    model: Path,
    dataset: Path,
    out: Path,
    scale: Scale,
    seed: int,
    extra=(),
    hparams=None,
    arch: str = "sd15",
) -> dict:
    """``train_sd.py --config configs/synthetic_NAME.yaml`` (:func:`stage_config` of ``arch``) with this
    run's paths, seed and sizes, and ``hparams`` (e.g. ``{"learning_rate": 1e-4, "beta_dpo": 1000}``)
    over the config's values."""
    method_flags = METHOD_CONFIG.get(name, (name, ()))[1]
    argv = [
        "--config", str(stage_config(name, arch)),
        "--pretrained_model_name_or_path", str(model),
        "--dataset_name", str(dataset),
        "--output_dir", str(out),
        "--seed", str(seed),
        *method_flags,
        *extra,
    ]  # fmt: skip
    for key, value in (hparams or {}).items():
        argv += [f"--{key}", str(value)]
    if scale.train_steps.get(name) is not None:
        argv += ["--max_train_steps", str(scale.train_steps[name])]
    summary = run_train_sd(argv)
    print(f"  {name}: {summary['global_step']} steps; last step: {_short(summary['last_metrics'])}")
    return summary


def _short(row: dict) -> str:
    keys = ("loss", "rewards/margins", "rewards/accuracies", "kto/kl", "eval/implicit_acc")
    return ", ".join(f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None)


def evaluate(
    models: dict[str, Path],
    data: dict[str, Path],
    out: Path,
    scale: Scale,
    seed: int,
    device: str,
    split: str = "heldout",
) -> None:
    """``eval/evaluate.py``: the ``split`` prompts (``heldout`` or ``validation``) with every model from
    seeds ``seed..seed+S-1``; the first model is the baseline (trainer outputs are sampled as
    trained: SD3 with its T5 length, ``evaluation.generate.trained_sampling_kwargs``)."""
    run_evaluate([
        *(arg for name, path in models.items() for arg in ("--model", f"{name}={path}")),
        "--prompts", str(data[f"{split}_prompts"]),
        "--scorer", "shapes",
        "--output_dir", str(out),
        "--num_images_per_prompt", str(scale.images_per_prompt),
        "--seed", str(seed),
        "--num_inference_steps", str(scale.inference_steps),
        "--guidance_scale", str(scale.guidance_scale),
        "--resolution", str(RESOLUTION),
        "--batch_size", "48",
        "--device", device,
        "--implicit_pairs", str(data[f"{split}_pairs"]),
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


TITLES = {
    "dpo": "Diffusion-DPO on the pairs",
    "sft": "SFT on the pairs' winners",
    "kto": "Diffusion-KTO on unpaired images",
    "ipo": "IPO (Diffusion-DPO's pairs, the IPO loss)",
    "mapo": "MaPO on the pairs (no reference model)",
}
#: Methods without a reference model in a full fine-tune: no implicit accuracy while they train.
NO_REFERENCE = ("sft", "mapo")


def _validation_flags(data: dict[str, Path], scale: Scale, world: str) -> list[str]:
    # the implicit-accuracy curve during training: validation pairs in the imperfect world, so that
    # nothing about the held-out prompts is looked at before the final evaluation
    pairs = data["validation_pairs"] if world == "imperfect" else data["heldout_pairs"]
    flags = ["--validation_dataset_name", str(pairs), "--num_validation_pairs", str(scale.n_heldout_pairs)]
    if scale.validation_steps is not None:
        flags += ["--validation_steps", str(scale.validation_steps)]
    return flags


def prepare_seed(args, seed: int, out: Path, scale: Scale, stages: Stages) -> tuple[dict, dict]:
    """Stages data, vae and base of one seed; returns (data paths, model paths)."""
    arch = getattr(args, "arch", "sd15")
    data = data_paths(out / "data")
    models = {name: out / "models" / name for name in ("init", "base", *WORLD_METHODS[args.world])}
    stages.run("data", "writing the synthetic datasets", write_data, data, scale, seed, args.world)
    stages.run(
        "vae", f"fitting the tiny {'SD3 (16-channel) ' if arch == 'sd3' else ''}VAE ({scale.vae_steps} steps) "
        "and building the untrained pipeline",
        build_initial_pipeline, models["init"], scale, seed, arch=arch,
    )  # fmt: skip
    stages.run(
        "base", f"pretraining the base {'transformer' if arch == 'sd3' else 'UNet'} on noisy captions "
        f"(train_sd.py, configs/{stage_config('base', arch).name})",
        train_stage, "base", models["init"], data["captions"], models["base"], scale, seed, arch=arch,
    )  # fmt: skip
    return data, models


def finish_seed(
    args, seed: int, out: Path, scale: Scale, stages: Stages, data: dict, models: dict, hparams: dict
) -> dict:
    """Stages: each method's fine-tune, the evaluation on the held-out prompts, the report; returns and
    writes the seed's ``results.json``."""
    import torch

    arch = getattr(args, "arch", "sd15")
    methods = WORLD_METHODS[args.world]
    datasets = {"kto": data["unpaired"]}
    for m in methods:
        extra = [] if m in NO_REFERENCE else _validation_flags(data, scale, args.world)
        stages.run(
            m, f"{TITLES[m]}, from the base (train_sd.py, configs/{stage_config(m, arch).name})"
            + (f" with {hparams[m]}" if hparams.get(m) else ""),
            train_stage, m, models["base"], datasets.get(m, data["pairs"]), models[m], scale, seed, extra,
            hparams.get(m), arch=arch,
        )  # fmt: skip
    eval_dir = out / "eval"
    stages.run(
        "evaluate", f"{len(synthetic.heldout_prompts())} held-out prompts x {scale.images_per_prompt} seeds, every model "
        "(eval/evaluate.py --scorer shapes --implicit_pairs)",
        evaluate, {name: models[name] for name in ("base", *methods)}, data, eval_dir, scale, seed, args.device,
    )  # fmt: skip

    def report() -> tuple[dict, dict]:
        table = results.method_results(json.loads((eval_dir / "summary.json").read_text()), methods)
        for name in ("base", *methods):
            table[name]["seconds"] = stages.seconds[name]
        if "sft" in methods:
            table["dpo_vs_sft"] = results.head_to_head(eval_dir / "scores.csv", "dpo", "sft")
        table["attributes"] = results.attribute_scores(eval_dir, ("base", *methods))
        return table, write_figures(out, eval_dir, {m: models[m] for m in methods})

    stages.done.pop("report", None)  # always rewritten: cheap, and it reads the current evaluation
    table, figures = stages.run("report", "results.json, results.md and the figures", report)
    # with --resume, the reused stages count with the time they took when they ran
    total = round(time.time() - stages.started + sum(stages.seconds[n] for n in stages.reused), 1)
    record = {
        **{m: table[m] for m in methods},
        "base": table["base"],
        **({"dpo_vs_sft": table["dpo_vs_sft"]} if "dpo_vs_sft" in table else {}),
        "attributes": table["attributes"],
        "seconds": {**stages.seconds, "total": total},
        "settings": {
            "seed": seed,
            "world": args.world,
            "arch": arch,
            "quick": args.quick,
            "caption_noise": CAPTION_NOISE,
            "prediction_type": ARCH_PREDICTION[arch],
            **(
                {
                    "annotator_agreement": synthetic.PICKAPIC_AGREEMENT,
                    "annotator_temperature": synthetic.calibrate_temperature(resolution=RESOLUTION),
                    "error_probs": list(synthetic.ERROR_PROBS),
                    "hyperparameters": hparams,
                }
                if args.world == "imperfect"
                else {}
            ),
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
    first = table[methods[0]]
    footer = (
        f"{first['n']} (prompt, seed) pairs on {first['n_prompts']} held-out prompts, "
        f"{scale.inference_steps} {ARCH_SAMPLER[arch]} steps, guidance {scale.guidance_scale}; total time {total:.0f} s "
        f"({args.num_threads} torch threads)."
    )
    markdown = (
        results.markdown_table(table, methods)
        + "\n\n"
        + footer
        + "\n\n"
        + results.attributes_markdown({seed: table["attributes"]}, ("base", *methods))
    )
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    print("\n" + markdown)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {figures['grid']}, {figures['curves']}")
    return record


def tune(args, seed: int, out: Path, scale: Scale, data: dict, models: dict) -> dict:
    """Choose each method's hyperparameters among :data:`SEARCH` by the win rate against the base on the
    validation prompts (implicit accuracy cannot rank SFT and MaPO, which have no reference); every
    method gets the same number of trials, all from the same base and data. Writes
    ``OUTPUT_DIR/tuning.json``; returns ``{method: hyperparameters}``."""
    tuning_dir = out / "tuning"
    tuning_dir.mkdir(parents=True, exist_ok=True)
    methods = WORLD_METHODS[args.world]
    trials = [(m, i, hp) for m in methods for i, hp in enumerate(SEARCH[m])]
    stages = Stages(
        [f"{m}-{i}" for m, i, _ in trials] + ["evaluate"], tuning_dir / "stages.json", args.resume
    )
    datasets = {"kto": data["unpaired"]}
    for m, i, hp in trials:
        # a trial's implicit accuracy on the validation pairs once, at its end (never the held-out ones)
        extra = (
            []
            if m in NO_REFERENCE
            else [*_validation_flags(data, scale, "imperfect"), "--validation_steps", "100000"]
        )
        stages.run(
            f"{m}-{i}", f"trial {i + 1}/{len(SEARCH[m])} of {m}: {hp}",
            train_stage, m, models["base"], datasets.get(m, data["pairs"]), tuning_dir / f"{m}-{i}", scale,
            seed, extra, hp,
        )  # fmt: skip
    eval_dir = tuning_dir / "eval"
    candidates = {"base": models["base"], **{f"{m}-{i}": tuning_dir / f"{m}-{i}" for m, i, _ in trials}}
    stages.run(
        "evaluate", f"every trial on the {len(synthetic.validation_split()[1])} validation prompts",
        evaluate, candidates, data, eval_dir, scale, seed, args.device, "validation",
    )  # fmt: skip
    summary = json.loads((eval_dir / "summary.json").read_text())
    table, chosen = [], {}
    for m in methods:
        scores = [(summary["win_rates"][f"{m}-{i}"]["shapes"], i) for i in range(len(SEARCH[m]))]
        best = max(scores, key=lambda item: (item[0]["win_rate"], -item[1]))[1]  # ties: the first
        chosen[m] = SEARCH[m][best]
        for wr, i in scores:
            table.append({"method": m, "trial": i, **SEARCH[m][i], **wr, "chosen": i == best})
    record = {"seed": seed, "split": "validation", "chosen": chosen, "trials": table}
    (args_out(args) / "tuning.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\nchosen on the validation prompts: " + "; ".join(f"{m} {hp}" for m, hp in chosen.items()))
    return chosen


def args_out(args) -> Path:
    return Path(args.output_dir)


def run(args: argparse.Namespace) -> dict:
    scale = scale_for(args.arch, args.quick)
    out = args_out(args)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    many = args.seeds is not None
    methods = WORLD_METHODS[args.world]
    stage_names = ["data", "vae", "base", *methods, "evaluate", "report"]
    print(
        f"synthetic preference experiment ({args.world} world, tiny {args.arch}, "
        f"{'quick' if args.quick else 'full'}), seeds "
        f"{seeds}, {args.num_threads} torch threads, output in {out}"
    )
    started = time.time()
    hparams: dict = {}
    records = {}
    for n, seed in enumerate(seeds):
        seed_dir = out / f"seed-{seed}" if many else out
        seed_dir.mkdir(parents=True, exist_ok=True)
        stages = Stages(stage_names, seed_dir / "stages.json", args.resume)
        data, models = prepare_seed(args, seed, seed_dir, scale, stages)
        if args.tune and n == 0:
            hparams = tune(args, seed, seed_dir, scale, data, models)
        records[seed] = finish_seed(args, seed, seed_dir, scale, stages, data, models, hparams)
    if not many:
        return records[seeds[0]]
    scores = {seed: out / f"seed-{seed}" / "eval" / "scores.csv" for seed in seeds}
    record = results.aggregate_seeds(records, methods, scores)
    record["seconds"] = round(time.time() - started, 1)
    record["settings"] = {
        "world": args.world,
        "arch": args.arch,
        "seeds": seeds,
        "quick": args.quick,
        "hyperparameters": hparams,
    }
    record["attributes"] = {seed: records[seed]["attributes"] for seed in seeds}
    markdown = (
        results.seeds_markdown(record, methods)
        + "\n\nWhat the images get right, per attribute (held-out prompts, mean over seeds):\n\n"
        + results.attributes_markdown(record["attributes"], ("base", *methods))
    )
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    print("\n" + markdown)
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
