"""Build the embedded default's assets (``configs/tiny.yaml``) where they do not exist yet.

Real preference tuning starts from a pretrained model (Stable Diffusion), and so does the embedded
default: the first run builds a small pretrained base in the synthetic shapes world, once, in about a
minute and a half on 2 CPU cores, and every later run reuses it:

1. a tiny VAE fitted on renders of the world (a random VAE's latents carry too little of the image);
2. the tiny SD1.5-shaped pipeline around it (random UNet, tiny CLIP), saved with ``save_pretrained``;
3. that UNet pretrained on captioned shapes whose captions are wrong 30% of the time, by this
   trainer (``--objective sft``), so the base follows its captions only partly.

Diffusion-DPO then starts from the base through the same ``from_pretrained`` path as real weights,
on synthetic Pick-a-Pic v2 pairs (the winner follows the caption) with held-out pairs drawn from the
same distribution (see ``data/make_synthetic_dataset.py``). A random UNet learns nothing from a few
hundred pairs that carries over to new ones; a base that already half-follows captions does.

``configs/tiny_sd3.yaml`` is the same for Stable Diffusion 3: which base is built is read from the
model path (:func:`tiny_base_arch`: ``outputs/tiny_sd3/base_model`` names SD3), so no config field is
needed; the SD3 base has a 16-channel VAE with SD3's latent shift and scale, the tiny SD3 pipeline
(MMDiT, two CLIPs and a T5) and a transformer pretrained by flow matching with the config's
``max_sequence_length`` T5 tokens.

Where it builds: only missing paths inside the working directory's ``outputs/`` folder, given as
relative paths (``outputs/tiny/pairs_train.parquet``; datasets as ``.parquet`` files), which is where the
shipped tiny configs put them (:func:`diffusion_dpo.training.preflight.is_embedded_asset_path`). A dataset, model or held-out path
anywhere else that does not exist is the user's mistake, and :mod:`diffusion_dpo.training.preflight` refuses it before
anything is built or loaded: the builder never writes synthetic data where a user's data was meant
to be.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)

TINY_TRAIN_PAIRS = 512
TINY_HELDOUT_PAIRS = 256
#: The base model: VAE fit and pretraining sizes (the synthetic experiment's --quick base, a little
#: shorter); the captions are wrong 30% of the time. The same for SD3 (its transformer learned best at
#: the UNet's 2e-3: loss 0.73 after 400 steps, 0.83 at 1e-3).
BASE_VAE_IMAGES, BASE_VAE_STEPS = 1024, 150
BASE_IMAGES, BASE_STEPS, BASE_BATCH, BASE_LR = 4000, 400, 32, 2e-3
BASE_CAPTION_NOISE = 0.3
#: The tiny bases :func:`build_tiny_base` builds, by the word that names them in a model path.
TINY_BASE_ARCHS = ("sd15", "sd3")


def tiny_base_arch(path: str | Path) -> str:
    """Which tiny base to build at ``path``: ``"sd3"`` when the folder's name or its parent's has the
    word ``sd3`` (words split at anything but letters and digits: ``outputs/tiny_sd3/base_model``,
    ``outputs/tiny/sd3-base``), else ``"sd15"`` (``outputs/tiny/base_model``).

    Keyed on the path, which the config names anyway, rather than on a config field of its own: the
    embedded defaults differ only in where their base lives. Only the last two parts count, so a
    folder further up (``/home/sd3/…``) does not change the model.
    """
    words = {w for part in Path(path).parts[-2:] for w in re.split(r"[^a-z0-9]+", part.lower())}
    return "sd3" if "sd3" in words else "sd15"


def build_tiny_base(
    path: Path,
    seed: int,
    resolution: int,
    arch: str = "sd15",
    max_sequence_length: int = 16,
    sampling: dict | None = None,
) -> Path:
    """Fit the VAE, save the untrained pipeline and pretrain its UNet with this trainer into ``path``.

    ``arch``: ``"sd15"`` (UNet, DDPM v-prediction) or ``"sd3"`` (MMDiT and a 16-channel VAE, rectified
    flow; pretrained with ``max_sequence_length`` T5 tokens, which DPO must use too). ``sampling``:
    ``num_inference_steps`` and ``guidance_scale`` the base records in its ``training_config.yaml``
    (the DPO config's), so ``eval/evaluate.py`` samples the base as the model trained from it.
    """
    import numpy as np

    from diffusion_dpo import synthetic
    from diffusion_dpo.models.pretrained import quiet_loading
    from diffusion_dpo.synthetic.vae import (
        ARCH_LATENT_CHANNELS,
        build_base_pipeline,
        fit_vae,
        images_to_tensor,
    )
    from diffusion_dpo.training.config import parse_config
    from diffusion_dpo.training.distributed import reset_accelerate_state
    from diffusion_dpo.training.loop import train

    if arch not in TINY_BASE_ARCHS:
        raise ValueError(f"arch must be one of {TINY_BASE_ARCHS}, got {arch!r}")
    started = time.time()
    work = path.parent / f"{path.name}_build"
    rng = np.random.default_rng(seed + 4)
    pixels = images_to_tensor(
        [synthetic.render(synthetic.sample_spec(rng), rng, resolution) for _ in range(BASE_VAE_IMAGES)]
    )
    logger.info("tiny base 1/3: fitting the VAE on %d renders (%d steps)", BASE_VAE_IMAGES, BASE_VAE_STEPS)
    vae = fit_vae(pixels, steps=BASE_VAE_STEPS, seed=seed, latent_channels=ARCH_LATENT_CHANNELS[arch])
    logger.info("tiny base 2/3: the untrained pipeline around it and %d captioned images", BASE_IMAGES)
    with quiet_loading():
        build_base_pipeline(
            vae, seed=seed, resolution=resolution, prediction_type="v_prediction", arch=arch
        ).save_pretrained(work / "init")
    captions = synthetic.write_caption_dataset(
        work / "captions.parquet", BASE_IMAGES, seed=seed, resolution=resolution,
        caption_noise=BASE_CAPTION_NOISE,
    )  # fmt: skip
    logger.info(
        "tiny base 3/3: pretraining the %s on %d captioned images (%d steps)",
        "transformer" if arch == "sd3" else "UNet", BASE_IMAGES, BASE_STEPS,
    )  # fmt: skip
    sd3_flags = ["--max_sequence_length", str(max_sequence_length)] if arch == "sd3" else []
    sampling_flags = [
        f for key, value in (sampling or {}).items() if value is not None for f in (f"--{key}", str(value))
    ]
    cfg = parse_config([
        "--pretrained_model_name_or_path", str(work / "init"), "--dataset_name", str(captions),
        "--output_dir", str(path), "--objective", "sft", "--resolution", str(resolution),
        "--train_batch_size", str(BASE_BATCH), "--max_train_steps", str(BASE_STEPS),
        "--learning_rate", str(BASE_LR), "--lr_scheduler", "cosine", "--lr_warmup_steps", "20",
        "--proportion_empty_prompts", "0.1", "--checkpointing_steps", "100000", "--seed", str(seed),
        *sd3_flags, *sampling_flags,
    ])  # fmt: skip
    train(cfg)
    # the trainer's process-wide accelerate state belongs to this run; the DPO run starts afresh
    reset_accelerate_state()
    # a base model, not a run to resume: drop the pretraining's checkpoint and the build folder
    for leftover in [*path.glob("checkpoint-*"), work]:
        shutil.rmtree(leftover)
    logger.info(
        "built the tiny base model at %s in %.0f s (reused by later runs)", path, time.time() - started
    )
    return path


def ensure_tiny_assets(cfg: TrainConfig) -> None:
    """Create the tiny base model and the synthetic datasets at the configured paths if they are missing."""
    from diffusion_dpo import synthetic
    from diffusion_dpo.training.preflight import is_embedded_asset_path

    for name, value, kind in (
        ("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path, "model"),
        ("dataset_name", cfg.dataset_name, "dataset"),
        ("validation_dataset_name", cfg.validation_dataset_name, "dataset"),
    ):  # a second guard under preflight's: never write where a user's own files were meant to be
        if value and not Path(value).exists() and not is_embedded_asset_path(value, kind):
            raise FileNotFoundError(
                f"--{name} {value} does not exist, and create_tiny_assets builds only inside ./outputs/"
            )
    model = Path(cfg.pretrained_model_name_or_path)
    if not model.exists():
        arch = tiny_base_arch(model)
        logger.info(
            "building the tiny %s base model at %s: done once, about a minute and a half on 2 CPU cores",
            "SD3" if arch == "sd3" else "SD1.5", model,
        )  # fmt: skip
        build_tiny_base(
            model, seed=cfg.seed, resolution=cfg.resolution, arch=arch,
            max_sequence_length=cfg.max_sequence_length or 16,
            sampling={"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale},
        )  # fmt: skip
    train_path = Path(cfg.dataset_name)
    if not train_path.exists():
        logger.info("writing %d synthetic training examples to %s", TINY_TRAIN_PAIRS, train_path)
        if cfg.effective_objective == "kto":
            synthetic.write_unpaired_dataset(
                train_path, TINY_TRAIN_PAIRS, seed=cfg.seed, resolution=cfg.resolution
            )
        else:
            synthetic.write_pair_dataset(
                train_path, TINY_TRAIN_PAIRS, seed=cfg.seed, resolution=cfg.resolution
            )
    if cfg.validation_dataset_name and not Path(cfg.validation_dataset_name).exists():
        # held-out pairs: the training prompts' distribution, renders never trained on (another seed)
        logger.info("writing %d held-out pairs to %s", TINY_HELDOUT_PAIRS, cfg.validation_dataset_name)
        synthetic.write_pair_dataset(
            cfg.validation_dataset_name, TINY_HELDOUT_PAIRS, seed=cfg.seed + 1, resolution=cfg.resolution
        )
